"""The words printed on the maps, read by OCR (``loaders/ocr.py``): every SQL statement about them.

Tables (created with the rest of the schema, ``schema.py``)
  ocr_models      provenance: the OCR engine, its version, its weight files (by SHA-256) and the
                  settings that change what it reads (OCR size, tiles, rotations, confidence floor)
  map_words       one row per piece of text read on a map (a label: one word or a few on one line),
                  with its confidence, its box normalised to the full image (``x``, ``y``, ``w``,
                  ``h`` in 0..1 from the top left: the box's axis-aligned bounds) and its reading
                  direction (``angle``, degrees counter-clockwise from left-to-right horizontal)
  map_words_fts   FTS5 over ``map_words.text``, folding case and diacritics (``unicode61
                  remove_diacritics 2``): "QUEBEC" finds "Québec"
  map_words_read  one row per map read: which OCR model, when, how many words (0: read, found no
                  text), the size of the image read; a rerun skips maps read by the same model

A map holds one reading: writing a map's words replaces any earlier reading of it (words and mark)
in one transaction with the new mark, so a map is never left with half its words, or with words
and no mark.  Text read off a map is data: it is stored as read and only ever bound as a parameter.

Word ids name their map: ``map_words.id = map_id * 2**20 + n`` (n: the word's place in its map's
reading, from 0), so the full-text index's rowid says which map printed a word (``rowid >> 20``)
without reading the row.  A ``words`` filter then reads only FTS5's doclist: a word printed on 2%
of 562,842 maps had cost ~14,000 row lookups (60-90 ms) before.  Files whose words were written
before this carry row-numbered ids until opened for writing (the ``word-ids-by-map`` migration);
``mapclip_meta`` key ``word-ids`` = ``by-map`` says which, and the SQL below answers both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .locations import resolved_location, stored_location
from .records import LoadNote, displayable, note_key
from .schema import MAP_IDS_WITH_WORDS, WORD_ID_BITS, WORD_IDS_KEY, WORDS_PER_MAP, now

OCR_STAGE = "ocr"  # load_errors.stage of a map OCR could not read
WORDS_TABLES = ("ocr_models", "map_words", "map_words_fts", "map_words_read")

# Whether this file's word ids name their map: a constant subquery, evaluated once per statement.
WORD_IDS_BY_MAP = f"(SELECT value = 'by-map' FROM mapclip_meta WHERE key = '{WORD_IDS_KEY}')"


def word_id(map_id: int, n: int) -> int:
    """The id of the ``n``-th piece of text (from 0) of a map's reading."""
    return (int(map_id) << WORD_ID_BITS) + int(n)


def word_map_sql(word_id_sql: str) -> str:
    """SQL: the map of the word whose id is ``word_id_sql`` (an FTS5 rowid): arithmetic where ids
    name their map, the row's ``map_id`` in older files."""
    return (f"CASE WHEN {WORD_IDS_BY_MAP} THEN {word_id_sql} >> {WORD_ID_BITS}"
            f" ELSE (SELECT map_id FROM map_words WHERE id = {word_id_sql}) END")


def map_word_ids_sql(map_id_sql: str) -> tuple[str, str]:
    """SQL: the lowest and highest word id the map ``map_id_sql`` can hold, for an FTS5 rowid range
    (``rowid BETWEEN low AND high``); in older files, the ids its reading holds (one transaction
    writes a map's words, so they are one run)."""
    low = (f"CASE WHEN {WORD_IDS_BY_MAP} THEN {map_id_sql} << {WORD_ID_BITS}"
           f" ELSE (SELECT min(id) FROM map_words WHERE map_id = {map_id_sql}) END")
    high = (f"CASE WHEN {WORD_IDS_BY_MAP} THEN ({map_id_sql} << {WORD_ID_BITS}) + {WORDS_PER_MAP - 1}"
            f" ELSE (SELECT max(id) FROM map_words WHERE map_id = {map_id_sql}) END")
    return low, high


def word_ids_by_map(conn) -> bool:
    """Whether this file's word ids name their map (``word_id``)."""
    try:
        row = conn.execute("SELECT value FROM mapclip_meta WHERE key = ?", (WORD_IDS_KEY,)).fetchone()
    except Exception:  # a file from before mapclip_meta
        return False
    return bool(row) and row[0] == "by-map"


class WordsNotStorable(ValueError):
    """A reading this file cannot hold: a map id outside 0 .. 2**43 - 1, or more than 2**20 words."""


@dataclass
class MapWord:
    """One piece of text read on a map: its box normalised to the full image (0..1, from the top
    left), its reading direction in degrees counter-clockwise from horizontal."""

    text: str
    confidence: float
    x: float
    y: float
    w: float
    h: float
    angle: float = 0.0


@dataclass
class MapToRead:
    """A ``maps`` row as the OCR pass needs it: where its pixels are, and its recorded size."""

    id: int
    source_id: str
    source: str | None
    location: str | None
    width: int | None
    height: int | None


@dataclass
class OcrModelRow:
    id: int
    name: str
    engine: str
    engine_version: str | None
    weights: dict
    settings: dict


def ocr_model_name(engine: str, engine_version: str | None, weights: dict, settings: dict) -> str:
    """The name of an OCR model row: the engine, its version and a hash of what changes its output
    (weights and reading settings), so a rerun with other settings is a new model."""
    digest = hashlib.sha256(json.dumps([weights, settings], sort_keys=True).encode()).hexdigest()[:12]
    return f"{engine}-{engine_version or 'unknown'}-{digest}"


class WordStore:
    """Writes the words of maps into a collection (``MapStore``'s connection and transactions)."""

    def __init__(self, store):
        self.store = store
        self.conn = store.conn

    def register_ocr_model(self, provenance: dict) -> OcrModelRow:
        """Get or create the ``ocr_models`` row of an engine's provenance: ``engine``,
        ``engine_version``, ``weights`` ({file name: sha256}), ``settings`` (JSON-able)."""
        weights, settings = provenance.get("weights") or {}, provenance.get("settings") or {}
        name = ocr_model_name(provenance["engine"], provenance.get("engine_version"), weights, settings)
        with self.store.transaction():
            self.conn.execute(
                "INSERT INTO ocr_models (name, engine, engine_version, weights, settings, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO NOTHING",
                (name, provenance["engine"], provenance.get("engine_version"), json.dumps(weights, sort_keys=True),
                 json.dumps(settings, sort_keys=True), now()))
        return read_ocr_model(self.conn, name)

    def maps_to_read(self, ocr_model_id: int, limit: int | None = None) -> tuple[list[MapToRead], int]:
        """Maps not yet read by this OCR model, in id order (at most ``limit``), and how many maps
        it has already read (skipped)."""
        done = self.conn.execute("SELECT count(*) FROM map_words_read WHERE ocr_model = ?",
                                 (ocr_model_id,)).fetchone()[0]
        rows = self.conn.execute(
            "SELECT maps.id, maps.source_id, maps.source, maps.location, maps.width, maps.height FROM maps "
            "LEFT JOIN map_words_read r ON r.map_id = maps.id AND r.ocr_model = ? "
            "WHERE r.map_id IS NULL ORDER BY maps.id LIMIT ?",
            (ocr_model_id, -1 if limit is None else int(limit))).fetchall()
        targets = [MapToRead(*tuple(row)) for row in rows]
        return [dataclasses.replace(t, location=resolved_location(t.location, self.store.path)) for t in targets], int(done)

    def write_reading(self, map_id: int, ocr_model_id: int, words: Iterable[MapWord], *,
                      size: tuple[int, int] | None = None, seconds: float | None = None,
                      error_key: str | None = None) -> int:
        """A map's words and its read mark, in one transaction, replacing any earlier reading of
        the map; ``error_key``: the map's OCR load error, cleared now that it was read.  Returns
        the number of words written (0 still marks the map as read)."""
        words = list(words)
        by_map = word_ids_by_map(self.conn)
        if by_map and not 0 <= int(map_id) < MAP_IDS_WITH_WORDS:
            raise WordsNotStorable(f"map id {map_id} is outside 0 .. {MAP_IDS_WITH_WORDS - 1:,}, the map ids "
                                   "whose words this file can number")
        if len(words) > WORDS_PER_MAP:
            raise WordsNotStorable(f"{len(words):,} pieces of text read, more than one map may hold "
                                   f"({WORDS_PER_MAP:,})")
        count = 0
        with self.store.transaction():
            self.conn.execute("DELETE FROM map_words WHERE map_id = ?", (map_id,))
            self.conn.execute("DELETE FROM map_words_read WHERE map_id = ?", (map_id,))
            for n, word in enumerate(words):
                self.conn.execute(
                    "INSERT INTO map_words (id, map_id, text, confidence, x, y, w, h, angle, ocr_model) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (word_id(map_id, n) if by_map else None, map_id, displayable(str(word.text)),
                     float(word.confidence), float(word.x), float(word.y), float(word.w), float(word.h),
                     float(word.angle), ocr_model_id))
                count += 1
            width, height = size if size else (None, None)
            self.conn.execute(
                "INSERT INTO map_words_read (map_id, ocr_model, read_at, word_count, width, height, seconds) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (map_id, ocr_model_id, now(), count, width, height, seconds))
            if error_key:
                self.conn.execute("DELETE FROM load_errors WHERE source_id = ? AND stage = ?",
                                  (displayable(error_key), OCR_STAGE))
        return count

    def record_failure(self, target: MapToRead, reason: str):
        """A map OCR could not read (fetch, decode, a refused size, the engine): a ``load_errors``
        row of stage ``ocr``, keyed apart from the map's own row so loading never clears it."""
        with self.store.transaction():
            self.store.record_note(LoadNote(ocr_error_key(target.source_id), OCR_STAGE, reason,
                                            location=stored_location(target.location, self.store.path),
                                            source=target.source))


def ocr_error_key(source_id: str) -> str:
    """The ``load_errors.source_id`` of a map's OCR failure."""
    return note_key(source_id, OCR_STAGE)


# -- reads ---------------------------------------------------------------------------------

def has_words(conn) -> bool:
    """Whether this file has the words tables (files written before them do not, until opened for writing)."""
    return conn.execute("SELECT count(*) FROM sqlite_master WHERE name IN ('map_words', 'map_words_fts', "
                        "'map_words_read', 'ocr_models')").fetchone()[0] == 4


def read_ocr_model(conn, name: str) -> OcrModelRow | None:
    row = conn.execute("SELECT id, name, engine, engine_version, weights, settings FROM ocr_models WHERE name = ?",
                       (name,)).fetchone()
    if row is None:
        return None
    return OcrModelRow(row[0], row[1], row[2], row[3], json.loads(row[4] or "{}"), json.loads(row[5] or "{}"))


def read_map_words(conn, map_id: int) -> list[dict]:
    """The words read on one map, top to bottom then left to right ([] when none, or no words tables)."""
    if not has_words(conn):
        return []
    rows = conn.execute(
        "SELECT id, text, confidence, x, y, w, h, angle, ocr_model FROM map_words WHERE map_id = ? "
        "ORDER BY y, x, id", (int(map_id),)).fetchall()
    return [dict(zip(("id", "text", "confidence", "x", "y", "w", "h", "angle", "ocr_model"), tuple(row)))
            for row in rows]


def read_map_reading(conn, map_id: int) -> dict | None:
    """A map's read mark (ocr_model, read_at, word_count, width, height, seconds), or None if unread."""
    if not has_words(conn):
        return None
    row = conn.execute("SELECT map_id, ocr_model, read_at, word_count, width, height, seconds FROM map_words_read "
                       "WHERE map_id = ?", (int(map_id),)).fetchone()
    return dict(zip(("map_id", "ocr_model", "read_at", "word_count", "width", "height", "seconds"),
                    tuple(row))) if row else None


def read_words_summary(conn) -> dict:
    """Maps read, of them with no text, and words stored."""
    if not has_words(conn):
        return {"maps_read": 0, "no_text": 0, "words": 0}
    read, empty = conn.execute("SELECT count(*), coalesce(sum(word_count = 0), 0) FROM map_words_read").fetchone()
    words = conn.execute("SELECT count(*) FROM map_words").fetchone()[0]
    return {"maps_read": int(read), "no_text": int(empty), "words": int(words)}


# -- full-text search over the words -------------------------------------------------------------

# A term of a query: a run of anything but white space.  Inside an FTS5 string (double quotes, any
# double quote doubled) the table's tokenizer splits and folds it, and no character is syntax.
_TERM = re.compile(r"\S+")
MAX_QUERY_TERMS = 16


def words_query_terms(text) -> list[str]:
    """User text -> FTS5 strings, one per term with a letter or digit in it (``"Cape"``, ``"Fear"``);
    at most ``MAX_QUERY_TERMS``.  Quoting makes every character literal: ``AND``, ``NEAR(``, ``*``,
    ``"`` or ``col:`` typed by a user are words to find, never FTS5 syntax."""
    terms = []
    for term in _TERM.findall(str(text or "")):
        term = "".join(ch for ch in term if ch.isprintable())  # NUL and other controls are no text
        if any(ch.isalnum() for ch in term):
            terms.append('"' + term.replace('"', '""') + '"')
    return terms[:MAX_QUERY_TERMS]


def words_fts_query(text) -> str | None:
    """User text as one FTS5 query matching a piece of text that holds every term (``"a" AND "b"``),
    or None when it has no term.  ``read_maps_matching_words`` matches the terms across a map instead."""
    terms = words_query_terms(text)
    return " AND ".join(terms) or None


def joined_term(text) -> str | None:
    """The query's terms written as one word (``"capefear"``): OCR often drops the space inside a
    two-word name ("CapeFear"), and a map that prints it that way should still be found."""
    words = [w for w in re.findall(r"\w+", str(text or "").casefold())]
    if len(words) < 2:
        return None
    return '"' + "".join(words)[:200].replace('"', '""') + '"'


def maps_matching_words_sql(terms: list[str], joined: str | None) -> str:
    """SQL of the map ids whose words hold every term (each term anywhere on the map), or the
    terms run together as one word; parameters: the terms, then the joined term if any."""
    per_term = f"SELECT {word_map_sql('map_words_fts.rowid')} AS map_id FROM map_words_fts WHERE map_words_fts MATCH ?"
    sql = "\nINTERSECT\n".join([per_term] * len(terms))
    if joined:
        sql = f"SELECT map_id FROM ({sql})\nUNION\n{per_term}"
    return sql


def read_maps_matching_words(conn, text, limit: int = 100) -> list[dict]:
    """Maps that print the words of ``text`` (case and accents folded; each term anywhere on the
    map): ``[{"map_id", "words": [the matching texts read on it]}]``, maps with more matching
    texts first, at most ``limit``.  User text never raises an FTS5 syntax error."""
    terms = words_query_terms(text)
    if not terms or not has_words(conn):
        return []
    joined = joined_term(text)
    params = [*terms, *([joined] if joined else [])]
    any_term = " OR ".join([*terms, *([joined] if joined else [])])
    rows = conn.execute(
        f"WITH hits AS ({maps_matching_words_sql(terms, joined)}) "
        "SELECT w.map_id, json_group_array(w.text) AS words, count(*) AS n FROM map_words w "
        "JOIN hits ON hits.map_id = w.map_id "
        "WHERE w.id IN (SELECT rowid FROM map_words_fts WHERE map_words_fts MATCH ?) "
        "GROUP BY w.map_id ORDER BY n DESC, w.map_id LIMIT ?",
        (*params, any_term, int(limit))).fetchall()
    return [{"map_id": row[0], "words": json.loads(row[1])} for row in rows]
