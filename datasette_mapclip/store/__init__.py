"""The store: one SQLite file per collection, with catalogue tables, sqlite-vec vectors and provenance.

    schema.py      the tables, named migrations, opening a connection with sqlite-vec
    map_store.py   MapStore: writes (maps, vectors, model rows, errors, notes, load runs)
    reads.py       reads (models, results, records, stored vectors, vector-table state)
    runs.py        whether a load run is alive
    catalogue.py   the loc.gov catalogue crawl's progress
    records.py     MapRecord, the shape of one sheet; display_row, a row as pages show it
    model_rows.py  ModelRow, one models row typed
    vectors.py     float32 BLOBs
    ids.py         map ids from requests
    locations.py   where a map's pixels are: local files relative to the collection's folder
    words.py       the words OCR read on the maps: provenance, words, read marks, full-text search

Every SQL statement on the project's tables lives in this folder (and the search SQL in search/sql.py).
This module re-exports the names the other parts use.
"""

from .locations import is_remote, local_file, resolved_location, stored_location
from .map_store import MapStore
from .model_rows import MODEL_COLUMNS, ModelRow
from .reads import (
    MAP_RECORD_COLUMNS,
    MAX_SHEETS_LISTED,
    QUERY_ENCODER_PARTS,
    RESULT_COLUMNS,
    ModelNotFound,
    StoredQueryEncoders,
    StoreError,
    iter_vector_ids,
    open_collection_readonly,
    pick_model,
    read_common_errors,
    read_counts,
    read_item_sheets,
    read_kept_paths_readonly,
    read_load_commands,
    read_map_location,
    read_map_record,
    read_map_summary,
    read_maps_readonly,
    read_models,
    read_models_at,
    read_query_encoders,
    read_result_rows,
    read_sample_titles,
    read_stored_vector,
    read_thumbnail,
    read_vector_blob,
    read_vector_count,
    read_vector_counters,
    read_vector_id_stats,
    read_vector_max_id,
    read_vectors,
    scan_vectors,
)
from .runs import STALE_LOAD_SECONDS, host_id
from .schema import (
    MAPS_TABLE,
    MIGRATIONS,
    SQLITE_INTERRUPT,
    TEXT_FIELDS,
    ExtensionsUnavailable,
    applied_migrations,
    connect,
    file_is_collection,
    has_place_index,
    is_collection,
    load_sqlite_vec,
    map_file_into_memory,
    now,
    prepare_schema,
    slug,
    sqlite3_module,
    text_indexes,
    vector_meta_keys,
)
from .words import (
    OCR_STAGE,
    MapToRead,
    MapWord,
    OcrModelRow,
    WordStore,
    has_words,
    ocr_error_key,
    read_map_reading,
    read_map_words,
    read_maps_matching_words,
    read_ocr_model,
    read_words_summary,
    words_fts_query,
    words_query_terms,
)
