"""The search: query parameters, the query vector, the search SQL, the in-memory index, the SQL
functions and the one search service (service.py) that the web pages, the CLI and Python share.
Needs no Datasette object; imports nothing of web/."""
