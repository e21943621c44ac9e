"""The loc.gov bulk catalogue crawl's progress (``loaders/sources/loc_catalogue.py``), kept in the
collection file so a killed crawl resumes where it stopped.  Mixed into ``MapStore``."""

from __future__ import annotations

from .schema import now


class CatalogueCrawl:
    """The crawl's two tables, created on first use."""

    # The bulk crawl's progress (``loaders/sources/loc_catalogue.py``): one row per partition of a
    # search (a date range) and one per search page fetched, written in the transaction that fills
    # that page's items, so a killed crawl resumes at the first page it had not committed.
    # Created on first use: files from before the bulk crawl gain them then, nothing else changes.
    CATALOGUE_CRAWL_SCHEMA = """
    CREATE TABLE IF NOT EXISTS loc_catalogue_partitions (
        search TEXT NOT NULL,       -- the search paged through, without paging parameters
        dates TEXT NOT NULL,        -- '' for the whole search, else 'FROM/TO' (years)
        expected INTEGER,           -- results expected before its first page (half its parent's)
        total INTEGER,              -- pagination.of, once its first page arrived
        pages INTEGER,              -- pages to fetch (0 when split into two halves)
        state TEXT NOT NULL,        -- 'todo' (first page not fetched), 'split', 'paging', 'done'
        updated_at TEXT,
        PRIMARY KEY (search, dates)
    );
    CREATE TABLE IF NOT EXISTS loc_catalogue_pages (
        search TEXT NOT NULL,
        dates TEXT NOT NULL,
        page INTEGER NOT NULL,
        results INTEGER,            -- results on the page
        filled INTEGER,             -- stored items it filled
        fetched_at TEXT,
        PRIMARY KEY (search, dates, page)
    );
    """

    def _catalogue_crawl_tables(self):
        self.conn.executescript(self.CATALOGUE_CRAWL_SCHEMA)

    def catalogue_partitions(self, search: str) -> list[dict]:
        """The stored partitions of a search, in the order they were made, each with ``done``:
        the set of its pages already fetched."""
        self._catalogue_crawl_tables()
        partitions = [dict(row, done=set()) for row in self.conn.execute(
            "SELECT * FROM loc_catalogue_partitions WHERE search = ? ORDER BY rowid", (search,))]
        by_dates = {p["dates"]: p for p in partitions}
        for dates, page in self.conn.execute(
                "SELECT dates, page FROM loc_catalogue_pages WHERE search = ?", (search,)):
            if dates in by_dates:
                by_dates[dates]["done"].add(page)
        return partitions

    def add_catalogue_partitions(self, search: str, partitions: list[tuple[str, int | None]]):
        """New partitions ``(dates, expected results)`` of a search, not yet fetched."""
        self._catalogue_crawl_tables()
        with self.transaction():
            for dates, expected in partitions:
                self.conn.execute(
                    "INSERT OR IGNORE INTO loc_catalogue_partitions (search, dates, expected, state, updated_at) "
                    "VALUES (?, ?, ?, 'todo', ?)", (search, dates, expected, now()))

    def forget_catalogue_crawl(self, search: str):
        """Drop a search's crawl progress (``loc-metadata --recrawl``); filled fields stay."""
        self._catalogue_crawl_tables()
        with self.transaction():
            self.conn.execute("DELETE FROM loc_catalogue_partitions WHERE search = ?", (search,))
            self.conn.execute("DELETE FROM loc_catalogue_pages WHERE search = ?", (search,))

    def record_catalogue_page(self, search: str, dates: str, page: int, filled: dict[str, dict], *,
                              results: int, total: int | None = None, pages: int | None = None,
                              state: str | None = None, split: list[tuple[str, int]] = (),
                              resolved_error_ids: list[str] = ()):
        """One search page, in one transaction: the catalogue fields of the stored items it held
        (``filled``: item id -> fields), the page as fetched, and what its partition now knows
        (``total``, ``pages``, ``state``; ``split``: the halves that replace it)."""
        self._catalogue_crawl_tables()
        with self.transaction():
            for item_id, fields in filled.items():
                self._write_catalogue(item_id, fields, f"metadata:{item_id}")
            for error_id in resolved_error_ids:
                self.conn.execute("DELETE FROM load_errors WHERE source_id = ?", (error_id,))
            if not split:  # a split partition's first page is not one of its halves' pages
                self.conn.execute(
                    "INSERT OR REPLACE INTO loc_catalogue_pages (search, dates, page, results, filled, fetched_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (search, dates, page, results, len(filled), now()))
            if total is not None:
                self.conn.execute("UPDATE loc_catalogue_partitions SET total = ?, pages = ? "
                                  "WHERE search = ? AND dates = ?", (total, pages, search, dates))
            for half, expected in split:
                self.conn.execute(
                    "INSERT OR IGNORE INTO loc_catalogue_partitions (search, dates, expected, state, updated_at) "
                    "VALUES (?, ?, ?, 'todo', ?)", (search, half, expected, now()))
            if state:
                self.conn.execute("UPDATE loc_catalogue_partitions SET state = ?, updated_at = ? "
                                  "WHERE search = ? AND dates = ?", (state, now(), search, dates))

    # -- reading back -----------------------------------------------------------------
