"""The web layer: Datasette routes and pages, uploads, permissions, the plugin's URLs and the few
differences between Datasette versions.  It adapts requests to the search service (search/)."""
