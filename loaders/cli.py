"""The loader commands of ``mapclip`` (``load folder|csv|loc``, ``import-beto``, ``loc-metadata``),
database path first.  They join the command root (``datasette_mapclip.cli``) as entry points."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from datasette_mapclip.cli import open_store
from datasette_mapclip.model import iiif
from datasette_mapclip.model.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED, PRECISIONS, ModelSpec, ModelUnavailable
from datasette_mapclip.model.images import DEFAULT_MAX_PIXELS
from datasette_mapclip.runtime import limit_image_pixels, prefer_hub_cache_when_offline, set_torch_threads

from .fetch import SAFETY_MARGIN, requests_per_minute
from .messages import shown
from .sources.loc import ITEM_LIMITS, SEARCH_LIMITS, limits_text

# What the limiter makes of loc.gov's published limits, for help texts (derived: it cannot drift).
SEARCH_PER_MINUTE = requests_per_minute(SEARCH_LIMITS)
ITEM_PER_MINUTE = requests_per_minute(ITEM_LIMITS)
LOC_PACE = (f"search pages at most {SEARCH_PER_MINUTE:.0f} a minute and item requests {ITEM_PER_MINUTE:.0f} a "
            f"minute, evenly spaced: loc.gov's published limits ({limits_text(SEARCH_LIMITS)}; "
            f"{limits_text(ITEM_LIMITS)}) less our {SAFETY_MARGIN:.0%} margin")


# The encoding options every command that embeds takes (loads here, `fine-tune register`), declared
# once; each is a click decorator that can be applied to any number of commands.
device_option = click.option("--device", help="torch device; default cuda if available, else cpu.")
precision_option = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
    help="auto: fp16 on CUDA; int8 image tower on CPU, checked against fp32 (min cosine 0.999) on the "
         "first batch, fp32 if it drifts.")
threads_option = click.option("--threads", type=int, default=None, help="CPU threads for the model (default: all cores).")
batch_size_option = click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                                 help="Images per model call and per transaction (on GPUs try 256).")
workers_option = click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True,
                              help="Threads fetching (or reading) and decoding images (--engine ray: threads per "
                                   "fetch task).")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bar.")
no_encoders_option = click.option(
    "--no-encoders", is_flag=True,
    help="Do not store the model's query encoders (ONNX text and image towers, tokenizer) in the file; "
         "searching it then needs torch and the model's weights wherever it is served.")
fp32_encoders_option = click.option(
    "--fp32-encoders", is_flag=True,
    help="Store the query encoders' towers at fp32 (no int8, whatever the check against open_clip says).")
ENCODING_OPTIONS = [device_option, precision_option, threads_option, batch_size_option, workers_option,
                    no_encoders_option, fp32_encoders_option]


def model_options(command):
    """--model/--pretrained/--checkpoint and the encoding knobs, on every command that embeds."""
    options = [
        click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True,
                     help="open_clip architecture (e.g. ViT-B-32, ViT-L-14, mapclip-tiny)."),
        click.option("--pretrained", default=DEFAULT_PRETRAINED, show_default=True,
                     help="open_clip pretrained tag; 'openai' is what the paper used."),
        click.option("--checkpoint", type=click.Path(dir_okay=False),
                     help="A local weights file (state_dict) for --model; overrides --pretrained."),
        *ENCODING_OPTIONS,
        click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True,
                     help="Refuse images with more pixels (decompression bombs)."),
        quiet_option,
    ] + engine_option_list()
    for option in reversed(options):
        command = option(command)
    return command


def engine_option_list():
    """--engine local|ray and the Ray engine's options (also on `fine-tune register`)."""
    return [
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: threads and the model in this process. ray: fetch and decode as Ray tasks and "
                          "embed in a pool of model actors (GPUs when the cluster has them, fp16 there), writing "
                          "to the same database here. Needs: pip install 'datasette-mapclip[ray]'."),
        click.option("--ray-address",
                     help="Ray cluster to join (--engine ray), e.g. 'auto' (the cluster `ray start` made on this "
                          "machine), 'head-node:6379' or 'ray://head-node:10001'. Default: $RAY_ADDRESS, else a "
                          "running local cluster, else a new local Ray for this run."),
        click.option("--actors", type=click.IntRange(min=1),
                     help="Model actors (--engine ray). Default: one per GPU, or one per node on a CPU cluster "
                          "(each using all of its node's cores, or --threads)."),
    ]


def ocr_options(command):
    """--ocr and --ocr-size on the load commands: the words printed on the maps are read once they
    are embedded (the pass `mapclip ocr` runs, with the command's image fetcher and its rate)."""
    from .ocr import DEFAULT_OCR_SIZE

    command = click.option(
        "--ocr-size", type=click.IntRange(min=256), default=DEFAULT_OCR_SIZE, show_default=True,
        help="With --ocr: read IIIF images (loc.gov) as derivatives of this many px on the long side; local "
             "files are read at full resolution.")(command)
    return click.option(
        "--ocr", is_flag=True,
        help="Also read the words printed on each map (RapidOCR) into map_words once the maps are embedded, "
             "as `mapclip ocr DB` does (with --engine ray, on the same Ray cluster: `mapclip ocr --engine ray`); "
             "rerun `mapclip ocr` to change its settings.")(command)


def keep_images_option(command):
    """--keep-images DIR on the commands that download images."""
    return click.option(
        "--keep-images", "keep_images", type=click.Path(file_okay=False),
        help="Keep each downloaded image (the model-sized derivative, ~59 KB as a 512 px JPEG: ~33 GB for "
             "562,842 maps) in DIR, recorded in the kept_images table, so re-embedding (`fine-tune register`, "
             "a rerun) and `fine-tune dataset` read it from there instead of the network. With --engine ray "
             "DIR is on this machine: workers send the images back.")(command)


def keep_images_or_exit(directory, size):
    """The keep folder of a command (None without --keep-images), checked before anything runs."""
    if not directory:
        return None
    from .kept_images import KeepImages

    keep = KeepImages(directory, size=size)
    try:
        keep.check_writable()
    except OSError as error:
        raise click.ClickException(f"cannot write to --keep-images {directory}: {error.strerror or error}")
    return keep


def ray_options_from(options: dict):
    from .ray_engine import RayOptions

    return RayOptions(address=options.get("ray_address"), actors=options.get("actors"), threads=options.get("threads"))


def spec_or_exit(model_name, pretrained, checkpoint) -> ModelSpec:
    """The model the options name, checked on this machine before a Ray cluster is asked to load it."""
    from datasette_mapclip.model.clip import import_open_clip

    spec = ModelSpec.from_options(model_name, pretrained, checkpoint)
    if spec.checkpoint and not Path(spec.checkpoint).is_file():
        raise click.ClickException(f"checkpoint file not found: {spec.checkpoint}")
    if spec.architecture not in import_open_clip().list_models():
        raise click.ClickException(f"unknown open_clip architecture {spec.architecture!r}. "
                                   "Examples: ViT-B-32, ViT-B-16, ViT-L-14, mapclip-tiny (see open_clip.list_models())")
    return spec


def ray_engine_or_exit():
    """The Ray engine module, or the advice to install Ray."""
    from . import ray_engine

    try:
        ray_engine.import_ray()
    except ray_engine.RayUnavailable as error:
        raise click.ClickException(str(error))
    return ray_engine


def load_encoder_or_exit(model_name, pretrained, checkpoint, device, precision, threads):
    """The encoder the options name, with this process's torch threads and hub access set for it."""
    from datasette_mapclip.model.clip import load_encoder

    spec = ModelSpec.from_options(model_name, pretrained, checkpoint)
    set_torch_threads(threads)
    if spec.pretrained:
        prefer_hub_cache_when_offline()
    try:
        return load_encoder(spec, device=device, precision=precision)
    except ModelUnavailable as error:
        raise click.ClickException(str(error))


def run_embedding(db_path, records, options, *, command, fetcher=None, store_thumbnails=False, total=None, after=None,
                  notes=None, notes_under=None, keep=None):
    from .load_run import LoadOptions
    from .pipeline import run_load

    if options.get("ocr"):
        from .ocr_cli import check_ocr_available

        check_ocr_available()  # before the model loads and the database is made
    limit_image_pixels(options["max_pixels"])
    load_options = LoadOptions(fetcher=fetcher, command=command, batch_size=options["batch_size"],
                               workers=options["workers"], store_thumbnails=store_thumbnails,
                               max_pixels=options["max_pixels"], total=total, progress=not options["quiet"],
                               notes=notes, notes_under=notes_under, keep=keep)
    if options.get("engine") == "ray":
        ray_engine = ray_engine_or_exit()
        spec = spec_or_exit(options["model_name"], options["pretrained"], options["checkpoint"])
        store = open_store(db_path)
        try:
            summary = ray_engine.run_ray_load(
                store, spec, records, load_options, options=ray_options_from(options), device=options["device"],
                precision=options["precision"], echo=lambda line: click.echo(f"{line}, database {db_path}", err=True))
        except ray_engine.RayUnavailable as error:
            raise click.ClickException(str(error))
    else:
        encoder = load_encoder_or_exit(options["model_name"], options["pretrained"], options["checkpoint"],
                                       options["device"], options["precision"], options["threads"])
        store = open_store(db_path)
        click.echo(f"model {encoder.name} ({encoder.precision} on {encoder.device}), database {db_path}", err=True)
        summary = run_load(store, encoder, records, load_options)
    if after:
        after(store, summary)
    click.echo(summary.line(), err=True)
    if summary.status == "finished" and not options.get("no_encoders"):
        from .query_encoders import after_embedding

        after_embedding(store, encoder if options.get("engine") != "ray" else None, summary.model,
                        lambda line: click.echo(line, err=True), int8=not options.get("fp32_encoders"))
    store.close()
    if summary.status == "interrupted":
        sys.exit(130)
    if summary.status == "stopped":
        sys.exit(2)
    if summary.status == "finished" and options.get("ocr"):
        exit_code = _read_words(db_path, options, fetcher, keep)
        if exit_code:
            sys.exit(exit_code)


def _read_words(db_path, options, fetcher, keep) -> int:
    """--ocr: the OCR pass over the collection just loaded (maps read before are skipped), on the
    load's engine (--engine ray: the OCR actors of `mapclip ocr --engine ray`)."""
    import os

    from .fetch import Fetcher, per_minute
    from .ocr import OcrSettings
    from .ocr_cli import ray_options, run_ocr

    settings = OcrSettings(ocr_size=options["ocr_size"], threads=options.get("threads") or os.cpu_count())
    own = fetcher is None  # a folder load fetches nothing: URLs in its metadata still need a fetcher
    fetcher = fetcher or Fetcher(per_minute(200))
    try:
        return run_ocr(db_path, settings, fetcher=fetcher, keep_images=keep.root if keep else None,
                       workers=min(options["workers"], 4), max_pixels=options["max_pixels"],
                       progress=not options["quiet"],
                       ray=ray_options(options.get("ray_address"), options.get("actors"), options.get("threads"))
                       if options.get("engine") == "ray" else None)
    finally:
        if own:
            fetcher.close()


@click.group()
def load():
    """Embed a collection into a database (created if missing). Rerunning resumes."""


@load.command("folder")
@click.argument("db_path", type=click.Path(dir_okay=False))
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--metadata", "metadata_csv", type=click.Path(exists=True, dir_okay=False),
              help="CSV of catalogue fields with a 'file' column (path relative to FOLDER); "
                   "FOLDER/metadata.csv is used when present. Columns: file, item_id, sheet, title, "
                   "date, year, place, subjects, contributors (';'-separated), notes, format, item_url, image_url. "
                   "UTF-8 or UTF-16 with a byte order mark; any other file is read as Windows-1252, and "
                   "the output says so.")
@click.option("--no-thumbnails", is_flag=True, help="Do not store a 256 px JPEG thumbnail per map.")
@click.option("--follow-symlinks", is_flag=True,
              help="Also load images that symbolic links lead to outside FOLDER (by default they are "
                   "skipped and listed, so a published collection holds only what FOLDER holds).")
@ocr_options
@model_options
def load_folder(db_path, folder, metadata_csv, no_thumbnails, follow_symlinks, **options):
    """Embed every image under FOLDER (JPEG, PNG, TIFF, GIF, WebP) into DB_PATH.

    Only the first page of a multi-page TIFF is embedded (a note in load_errors says so).
    Catalogue values that cannot be stored (a year of 10^20) are left out with a note.

    Example: mapclip load folder maps.db ./scans
    """
    from .sources.folder import FolderReport, MetadataError, folder_records

    report = FolderReport()
    try:
        records = list(folder_records(folder, metadata_csv, follow_symlinks=follow_symlinks, report=report))
    except MetadataError as error:
        raise click.ClickException(str(error))
    click.echo(f"{len(records)} images under {folder}", err=True)
    if report.encoding_note:
        click.echo(f"note: {report.encoding_note}", err=True)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    notes = report.notes + _skipped_link_notes(report.root, report.skipped_links)
    if report.skipped_links:
        listed = "; ".join(f"{shown(name)} ({why})" for name, why in report.skipped_links[:10])
        listed += " ..." if len(report.skipped_links) > 10 else ""
        click.echo(f"skipped {len(report.skipped_links)} symbolic links: {listed}", err=True)
    run_embedding(db_path, records, options, command=f"load folder {folder}",
                  store_thumbnails=not no_thumbnails, total=len(records), notes=notes, notes_under=report.root)


def _skipped_link_notes(root: str, skipped_links: list[tuple[str, str]]) -> list:
    from datasette_mapclip.store.records import LoadNote

    # Keyed by the link's name (its source_id if loaded); located at the link, never its target.
    return [LoadNote(name, "source", f"not loaded: {why}", location=str(Path(root) / name),
                     source="folder")
            for name, why in skipped_links]


@load.command("csv")
@click.argument("db_path", type=click.Path(dir_okay=False))
@click.argument("file_list", type=click.Path(exists=True, dir_okay=False))
@click.option("--size", type=click.IntRange(min=1), default=iiif.DEFAULT_SIZE, show_default=True,
              help="Ask the IIIF server for images that fit SIZE x SIZE (not the seed's 2000 px).")
@click.option("--rate", type=click.FloatRange(min=0), default=200, show_default=True,
              help="Image requests per minute, shared by all workers and evenly spaced, less our "
                   f"{SAFETY_MARGIN:.0%} margin (loc.gov allows 200). 0: unlimited.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30, show_default=True,
              help="Seconds per HTTP request.")
@click.option("--limit", type=click.IntRange(min=1), help="Stop after this many images.")
@keep_images_option
@ocr_options
@model_options
def load_csv(db_path, file_list, size, rate, timeout, limit, keep_images, **options):
    """Embed the IIIF images listed in the seed's FILE_LIST CSV
    (columns file_url, resource_url, segment_num, p1_item_id, file_count).

    PDF report rows are skipped and counted; rows with missing values become load errors.
    Catalogue fields can be filled afterwards with `mapclip loc-metadata`.
    """
    import itertools

    from .fetch import Fetcher, per_minute
    from .sources.file_list import FileListError, FileListStats, read_file_list

    stats = FileListStats()
    try:
        records = list(itertools.islice(read_file_list(file_list, size=size, stats=stats), limit))
    except FileListError as error:
        raise click.ClickException(str(error))
    click.echo(f"{stats.rows} rows: {len(records)} images, {stats.pdf_reports} PDF reports skipped, "
               f"{len(stats.bad_rows)} malformed rows", err=True)
    if stats.encoding_note:
        click.echo(f"note: {stats.encoding_note}", err=True)

    def record_bad_rows(store, summary):
        with store.transaction():
            for record, reason in stats.bad_rows:
                store.record_error(record, "source", reason)
        summary.failed += len(stats.bad_rows)
        for record, reason in stats.bad_rows:
            summary.add_problem(record.source_id, "source", reason)

    keep = keep_images_or_exit(keep_images, size)
    fetcher = Fetcher(per_minute(rate), timeout=timeout)
    run_embedding(db_path, records, options, command=f"load csv {file_list}", fetcher=fetcher,
                  total=len(records), after=record_bad_rows, keep=keep)


@load.command("loc")
@click.argument("db_path", type=click.Path(dir_okay=False))
@click.argument("url")
@click.option("--limit", type=click.IntRange(min=1), help="Stop after this many map sheets.")
@click.option("--first-sheet-only", is_flag=True,
              help="Do not read IIIF manifests of multi-sheet items (atlases, Sanborn volumes): one image per item.")
@click.option("--size", type=click.IntRange(min=1), default=iiif.DEFAULT_SIZE, show_default=True,
              help="Ask the IIIF server for images that fit SIZE x SIZE.")
@click.option("--rate", type=click.FloatRange(min=0), default=200, show_default=True,
              help="Image requests per minute, shared by all workers and evenly spaced, less our "
                   f"{SAFETY_MARGIN:.0%} margin. 0: unlimited images. Manifests are item requests: {LOC_PACE}.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30, show_default=True,
              help="Seconds per HTTP request.")
@keep_images_option
@ocr_options
@model_options
def load_loc(db_path, url, limit, first_sheet_only, size, rate, timeout, keep_images, **options):
    """Embed the maps of a loc.gov search or collection URL, with catalogue fields from each result.

    Example: mapclip load loc maps.db "https://www.loc.gov/collections/sanborn-maps/?fa=location:arkansas" --limit 500
    """
    from .fetch import Fetcher
    from .sources.loc import LocSearch, limiters

    keep = keep_images_or_exit(keep_images, size)
    limit_for = limiters(rate)
    search = LocSearch(url, Fetcher(limit_for["search"], timeout=timeout), limit=limit,
                       all_sheets=not first_sheet_only, size=size,
                       item_fetcher=Fetcher(limit_for["item"], timeout=timeout))

    def record_problems(store, summary):
        with store.transaction():
            for record, reason in search.problems:
                store.record_error(record, "manifest", reason)

    from .fetch import FetchError, RateLimited

    try:
        search.first_page()  # a wrong URL is said before the model loads and before the database is made
    except (FetchError, RateLimited) as error:
        raise click.ClickException(f"search page failed: {error}")
    try:
        run_embedding(db_path, iter(search), options, command=f"load loc {url}",
                      fetcher=Fetcher(limit_for["image"], timeout=timeout), total=limit, after=record_problems,
                      keep=keep)
    except (FetchError, RateLimited) as error:
        raise click.ClickException(f"search page failed: {error}")


@click.command("import-beto")
@click.argument("db_path", type=click.Path(dir_okay=False))
@click.argument("beto", type=click.Path(exists=True, dir_okay=False))
@click.argument("beto_idx", type=click.Path(exists=True, dir_okay=False))
@click.option("--files", "files_csv", type=click.Path(exists=True, dir_okay=False),
              help="The seed's merged_files.csv, to attach item ids and sheet numbers.")
@click.option("--rows-per-commit", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Rows written per transaction.")
@click.option("--batch-size", "old_batch_size", type=click.IntRange(min=1), hidden=True,
              help="The old name of --rows-per-commit.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def import_beto(db_path, beto, beto_idx, files_csv, rows_per_commit, old_batch_size, quiet):
    """Store the seed's published embeddings (BETO: N x 512 tensor, BETO_IDX: N image URLs)
    without re-embedding, as model ViT-B-32/openai. Rerunning skips rows already stored.

    Fill in catalogue fields afterwards with `mapclip loc-metadata DB_PATH`.
    """
    from tqdm import tqdm

    from datasette_mapclip.store.vectors import normalise

    from .sources.beto import BETO_PROVENANCE, BetoError, beto_records, files_lookup, read_beto

    if old_batch_size:
        click.echo("note: import-beto's --batch-size is now --rows-per-commit (--batch-size means images per "
                   "model call elsewhere)", err=True)
        rows_per_commit = old_batch_size
    try:
        matrix, urls = read_beto(beto, beto_idx)
        lookup = files_lookup(files_csv)
    except BetoError as error:
        raise click.ClickException(str(error))
    store = open_store(db_path)
    model = store.register_model({**BETO_PROVENANCE, "dim": int(matrix.shape[1])}, precision="seed beto.pt")
    records = beto_records(urls, lookup)
    done = store.embedded_source_ids(model)
    todo = [i for i, record in enumerate(records) if record.source_id not in done]
    started = time.perf_counter()
    load_id = store.start_load(f"import-beto {beto}", model.name)
    with tqdm(total=len(todo), unit="vec", desc="importing", disable=quiet) as bar:
        for start in range(0, len(todo), rows_per_commit):
            rows = todo[start:start + rows_per_commit]
            store.write_batch(model, [records[i] for i in rows], normalise(matrix[rows]))
            bar.update(len(rows))
    store.finish_load(load_id, "finished", len(todo), len(records) - len(todo), 0)
    click.echo(f"imported {len(todo)} vectors, {len(records) - len(todo)} already stored, "
               f"in {time.perf_counter() - started:.1f} s", err=True)


LOC_METADATA_HELP = f"""Fill catalogue fields (title, date, place, subjects...) from loc.gov for maps that have
    an item id but no title (rows from `load csv` or `import-beto`).

    By default it pages through a loc.gov search, 150 results a request, and matches results to
    stored items by item id: about {round(150 * SEARCH_PER_MINUTE, -2):,.0f} items a minute, against
    {ITEM_PER_MINUTE:.0f} a minute from the item endpoint, which is asked only for items no page returned
    ({LOC_PACE}).

    loc.gov does not page past 100,000 results of one search, so a larger search is partitioned
    by date ranges (dates=FROM/TO): a range is split in two whenever its total passes
    --result-cap, until every part can be paged to its end. Items without a date are in no range:
    a search under the cap is paged whole and includes them, otherwise the item endpoint fills them.

    Rerunning continues from the stored partition and page and never asks again for a page it
    stored or an item already filled. A 429 with a long Retry-After stops the run (rerun later);
    a page that fails after retries is noted in load_errors and the crawl goes on.

    Example: mapclip loc-metadata maps.db --search "https://www.loc.gov/collections/sanborn-maps/"
    """


@click.command("loc-metadata", help=LOC_METADATA_HELP)
@click.argument("db_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--api", default="https://www.loc.gov", show_default=True, help="loc.gov API base URL.")
@click.option("--search", "search_url",
              help="The loc.gov search or collection whose result pages hold the items, e.g. "
                   "https://www.loc.gov/collections/sanborn-maps/ (its fa= and q= are kept; its dates= bounds the "
                   "date ranges). Default: "
                   "derived from the stored item ids: the Sanborn collection when every item is a Sanborn "
                   "volume, else loc.gov's maps format (API/maps/), which holds every map.")
@click.option("--method", type=click.Choice(["auto", "bulk", "item"]), default="auto", show_default=True,
              help="auto: search pages (150 items a request), then the item endpoint for what they did not "
                   "return; the item endpoint alone when that is quicker at loc.gov's limits (a small set, "
                   "or a search much larger than the items). bulk: search pages only; items never returned "
                   "are noted in load_errors as missing. item: one item request per item.")
@click.option("--dates", "dates", metavar="FROM/TO",
              help="The years the crawl splits into date ranges when the search passes --result-cap. "
                   "Default: the search's own dates=, else 1000/<this year>.")
@click.option("--result-cap", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Results loc.gov pages through in one search (it does not page past 100,000).")
@click.option("--pages-in-flight", type=click.IntRange(min=1), default=4, show_default=True,
              help="Search pages requested at once; all share the search limiter, so more only hides latency.")
@click.option("--workers", "old_workers", type=click.IntRange(min=1), hidden=True,
              help="The old name of --pages-in-flight.")
@click.option("--recrawl", is_flag=True,
              help="Forget this search's stored crawl progress and page through it again "
                   "(for items stored after a finished crawl). Filled fields stay.")
@click.option("--limit", type=click.IntRange(min=0), help="At most this many items this run.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30, show_default=True,
              help="Seconds per HTTP request.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def loc_metadata(db_path, api, search_url, method, dates, result_cap, pages_in_flight, old_workers, recrawl, limit,
                 timeout, quiet):
    from .fetch import Fetcher, RateLimited, RateLimiter
    from .sources.loc_catalogue import CatalogueSummary, fill_catalogue, parse_dates

    if old_workers:
        click.echo("note: loc-metadata's --workers is now --pages-in-flight (--workers means image-reading "
                   "threads elsewhere)", err=True)
        pages_in_flight = old_workers
    try:
        years = parse_dates(dates) if dates else None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--dates")
    store = open_store(db_path)
    summary = CatalogueSummary()
    try:
        fill_catalogue(store, Fetcher(RateLimiter(SEARCH_LIMITS), timeout=timeout),
                       Fetcher(RateLimiter(ITEM_LIMITS), timeout=timeout), api=api, search=search_url,
                       method=method, years=years, cap=result_cap, workers=pages_in_flight, limit=limit, recrawl=recrawl,
                       progress=not quiet, echo=lambda line: click.echo(line, err=True), summary=summary)
    except RateLimited as error:
        click.echo(summary.line(), err=True)
        raise click.ClickException(str(error))
    except KeyboardInterrupt:
        click.echo(summary.line(), err=True)
        click.echo("interrupted: rerun the same command to continue where it stopped", err=True)
        sys.exit(130)
    finally:
        store.close()
    click.echo(summary.line(), err=True)


@click.group()
def encoders():
    """Query encoders stored in a collection file, so it can be searched without torch."""


@encoders.command("add")
@click.argument("db_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_name", help="Model name as in the models table (default: the default model).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="The model's weights file, when this machine's checkpoint registry does not know it "
                   "(checked against the SHA-256 the models row records).")
@click.option("--fp32", is_flag=True, help="Store fp32 towers only (no int8, whatever the check says).")
@click.option("--force", is_flag=True, help="Export again even if the file already carries them.")
def encoders_add(db_path, model_name, checkpoint, fp32, force):
    """Export a model's text and image towers (ONNX), tokenizer and image preprocessing into DB_PATH.

    The file can then be searched, served and published with no torch and no weights from anywhere
    else. Each int8 tower is kept only if it matches open_clip's fp32 output on a fixed probe set
    (520 texts, 100 images; every cosine >= 0.995), else fp32 is stored.

    Example: mapclip encoders add maps.db
    """
    from datasette_mapclip.model.clip import ModelUnavailable
    from datasette_mapclip.model.export import ExportError
    from datasette_mapclip.store import ModelNotFound, StoreError, open_collection_readonly

    from .query_encoders import encoder_for_row, store_query_encoders

    try:
        open_collection_readonly(db_path).close()  # never create a schema in a file that is not a collection
    except StoreError as error:
        raise click.ClickException(str(error))
    store = open_store(db_path)
    try:
        encoder = encoder_for_row(store, model_name, checkpoint)
        click.echo(store_query_encoders(store, encoder, force=force, int8=not fp32), err=True)
    except (ModelNotFound, ModelUnavailable, ExportError) as error:
        raise click.ClickException(str(error))
    finally:
        store.close()


@encoders.command("remove")
@click.argument("db_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_name", help="Model name as in the models table (default: the default model).")
def encoders_remove(db_path, model_name):
    """Remove a model's stored query encoders from DB_PATH (searching it then needs torch)."""
    from datasette_mapclip.store import ModelNotFound, StoreError, open_collection_readonly

    try:
        open_collection_readonly(db_path).close()
    except StoreError as error:
        raise click.ClickException(str(error))
    store = open_store(db_path)
    try:
        model = store.model(model_name)
        store.remove_query_encoders(model.name)
        click.echo(f"query encoders of {model.name} removed", err=True)
    except ModelNotFound as error:
        raise click.ClickException(str(error))
    finally:
        store.close()
