"""Every plugin setting, declared once: its name, default, type and help.

A publisher writes them under ``plugins: datasette-mapclip:`` (per database where given); the
plugin reads them only through ``Settings``, which gives each declared setting its declared type
(a value of the wrong type falls back to the default, with one warning in the server's log, so a
typo in a YAML file never turns into a 500) and its default where none is given.  The docs'
configuration blocks are tested against this list.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def _positive_int(value) -> int:
    if isinstance(value, bool):
        raise ValueError("a whole number, not true/false")
    number = int(value)
    if isinstance(value, float) and number != value:
        raise ValueError("a whole number")
    if number < 0:
        raise ValueError("a whole number, 0 or more")
    return number


def _at_least_one(value) -> int:
    number = _positive_int(value)
    if number < 1:
        raise ValueError("a whole number, 1 or more")
    return number


def _seconds(value) -> float:
    if isinstance(value, bool):
        raise ValueError("a number of seconds")
    number = float(value)
    if not 0 <= number < float("inf"):
        raise ValueError("a number of seconds, 0 or more")
    return number


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    raise ValueError("true or false")


def _text(value) -> str:
    if not isinstance(value, str):
        raise ValueError("text")
    return value


def _choice(*choices: str) -> Callable:
    def check(value) -> str:
        if value not in choices:
            raise ValueError(" or ".join(repr(c) for c in choices))
        return value
    return check


def _names(value) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("a list of names")
    return [v.strip() for v in value if v.strip()]


def _mapping(value) -> dict:
    if not isinstance(value, dict):
        raise ValueError("a mapping")
    return value


def _as_given(value):
    return value  # read and checked by the part that uses it (about.py: example links)


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    default: object
    read: Callable  # value as configured -> value of the declared type; ValueError says what is expected
    help: str


SETTINGS: tuple[Setting, ...] = (
    # the model
    Setting("checkpoints", None, _mapping, "model name or checkpoint SHA-256 -> a local copy of its weights file"),
    Setting("query_encoders", "stored", _choice("stored", "torch"),
            '"stored": encode queries with the ONNX encoders the file carries (no torch); "torch": with open_clip'),
    Setting("precision", "fp32", _choice("auto", "fp32", "int8", "fp16"),
            "precision the server runs an open_clip model at (models without stored encoders)"),
    Setting("threads", 1, _at_least_one, "threads of the model (ONNX Runtime's, or torch's set in its thread at start-up)"),
    Setting("text_cache_size", 4096, _positive_int, "text embeddings cached per model per server"),
    Setting("prompt_template", "{}", _text, 'how a text query is put to the model, e.g. "a {} map"'),
    Setting("preload_model", True, _flag, "load the model at start-up, beside the index build"),
    # the index
    Setting("index", "auto", _choice("auto", "off"), '"off": every search through sqlite-vec'),
    Setting("index_dir", None, _text, "where the float32 vector cache goes (default: beside the database)"),
    Setting("scan_threads", 2, _at_least_one,
            "threads that scan one query's int8 codes side by side, each a part of them (at most the CPU count)"),
    Setting("int8_min_rows", 50_000, _positive_int, "smaller collections are scanned exactly in float32"),
    Setting("rerank", 256, _at_least_one, "int8 candidates re-scored exactly"),
    Setting("fast_scan_min_rows", 100_000, _positive_int,
            "collections of at least this many maps also get 4-bit fast-scan codes, the first stage of "
            "unfiltered searches (built once the int8 index serves)"),
    Setting("fast_candidates", 1000, _at_least_one, "fast-scan candidates re-scored exactly"),
    Setting("filter_pool", 512, _at_least_one,
            "nearest maps checked against a filter before searching the filter's maps"),
    # Scoring exactly gathers each map's float32 row from the memory-mapped vectors (scattered page
    # reads); past a few thousand maps the int8 scan with the other maps masked, then re-scoring, is
    # faster: a words filter on 17,000-28,000 maps, p50 84 -> 45 ms at 50,000 -> 5,000 (words.md).
    Setting("exact_subset_rows", 5_000, _positive_int,
            "a filter selecting at most this many maps scores them all exactly"),
    Setting("index_delta_rows", None, _positive_int,
            "maps added since the index's base before it is rebuilt (default: the larger of 20,000 and 5% of the base)"),
    Setting("index_removed_rows", 2_000, _positive_int, "maps deleted since the index's base before it is rebuilt"),
    Setting("sqlite_mmap_mb", 0, _positive_int,
            "megabytes of a collection file SQLite reads through a memory map (PRAGMA mmap_size; 0: off): "
            "word and full-text lookups in a file of gigabytes run about twice as fast, and the pages read "
            "count in the server's resident memory"),
    Setting("index_check_interval", 0.5, _seconds, "seconds between two checks of the file for new vectors"),
    Setting("index_verify_interval", 2.0, _seconds,
            "seconds between two full reads of the vectors' state after the file changed"),
    # uploads
    Setting("max_upload_bytes", 10 * MIB, _at_least_one, "bytes of one uploaded image"),
    Setting("max_upload_pixels", 50_000_000, _at_least_one, "pixels of one uploaded image (checked before decoding)"),
    Setting("max_upload_decoded_bytes", 64 * MIB, _at_least_one,
            "memory one uploaded image may take decoded (checked before decoding)"),
    # pages
    Setting("iiif_hosts", None, _names,
            "image services (and their subdomains) a map's page opens in the deep-zoom viewer "
            "(default: loc.gov and the hosts the collection was loaded from)"),
    Setting("max_image_side", 4096, _at_least_one,
            "longest side, in pixels, of a local map image as the map page's deep-zoom viewer gets it "
            "(the file is re-encoded as JPEG no larger than this)"),
    Setting("citation_repository", None, _text, "the archive citations name (default: the Library of Congress for loc.gov records, else none)"),
    Setting("models_menu", None, _names,
            "models the search page's menu offers beside the default one (default: none, so no menu; any model "
            "can still be searched with model= in the URL)"),
    Setting("example_queries", None, _as_given, "example text searches offered on the search page"),
    Setting("example_map", None, _as_given, 'a map id offered on the search page as "maps like this one"'),
    Setting("model_note", None, _text, "the About page: what the model is and how it was made"),
    Setting("training_note", None, _text, "the About page: what the model was trained on"),
    Setting("report_url", None, _text, "the About page: where a visitor reports a problem (http(s) only)"),
    Setting("contact", None, _text, "the About page: a contact shown as text"),
)
DECLARED = {setting.name: setting for setting in SETTINGS}
_warned: set = set()


class Settings(dict):
    """The plugin configuration with every declared setting present and of its declared type.
    Read as ``settings.threads`` (or ``settings["threads"]``); undeclared keys are kept as given."""

    def __init__(self, raw: dict | None = None, *, where: str = "datasette-mapclip"):
        raw = dict(raw or {})
        values = {}
        for setting in SETTINGS:
            value = raw.pop(setting.name, None)
            if value is None:
                values[setting.name] = setting.default
                continue
            try:
                values[setting.name] = setting.read(value)
            except (TypeError, ValueError, OverflowError) as error:
                _warn_once(f"{where}: setting {setting.name} is {value!r}; expected {error}. "
                           f"Using the default, {setting.default!r}")
                values[setting.name] = setting.default
        for name in raw:
            _warn_once(f"{where}: unknown setting {name!r} (settings: {', '.join(DECLARED)})")
        super().__init__({**raw, **values})

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def settings_of(config) -> Settings:
    """``config`` as Settings (a plain dict, as tests and Python callers pass, is read the same way)."""
    return config if isinstance(config, Settings) else Settings(config)


def _warn_once(message: str):
    if message not in _warned:
        _warned.add(message)
        log.warning("mapclip: %s", message)
