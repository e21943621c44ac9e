"""``mapclip``: the one command root, database path first (as sqlite-utils does).

The commands that need only the store live here (``info``, ``export-vectors``).  The command
groups of the other packages (``load``, ``import-beto`` and ``loc-metadata`` from ``loaders``;
``fine-tune`` and ``demo`` from ``fine_tune``) join through the ``mapclip.commands`` entry points
declared in setup.py, so this core package never imports them: dependencies point one way
(fine_tune -> loaders -> datasette_mapclip).
"""

from __future__ import annotations

import csv
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click

COMMANDS_GROUP = "mapclip.commands"


def open_store(db_path):
    """The database at ``db_path`` (created if missing), or a ClickException that says why not."""
    from .store import ExtensionsUnavailable, MapStore

    try:
        return MapStore(db_path)
    except ExtensionsUnavailable as error:
        raise click.ClickException(str(error))


class CommandRoot(click.Group):
    """A click group whose commands are its own plus every ``mapclip.commands`` entry point."""

    def _plugged_in(self) -> dict:
        return {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._plugged_in()))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None and name in self._plugged_in():
            command = self._plugged_in()[name].load()
        return command


@click.group(cls=CommandRoot)
@click.version_option(package_name="datasette-mapclip")
def cli():
    """Search map collections by what the maps look like: load images into a SQLite file
    with CLIP embeddings (sqlite-vec), then serve it with Datasette."""


@cli.command("info")
@click.argument("db_path", type=click.Path(exists=True, dir_okay=False))
def info(db_path):
    """Counts, models (provenance), stored query encoders and the most common load errors of a
    collection.  Reads the file only."""
    from . import store

    try:
        conn = store.open_collection_readonly(db_path)
    except (store.StoreError, store.ExtensionsUnavailable) as error:
        raise click.ClickException(str(error))
    try:
        counts = store.read_counts(conn)
        click.echo(f"{counts['maps']} maps in {counts['items']} items, {counts['load_errors']} load errors")
        encoders = store.read_query_encoders(conn)
        for model in store.read_models(conn):
            default = " (default)" if model.is_default else ""
            click.echo(f"model {model.name}{default}: {store.read_vector_count(conn, model)} vectors of {model.dim} "
                       f"floats in {model.vector_table}, open_clip {model.open_clip_version}, "
                       f"sqlite-vec {model.sqlite_vec_version}")
            parts = [row for row in encoders if row["model"] == model.name]
            if parts:
                shown = ", ".join(f"{row['part']}{' ' + row['precision'] if row['precision'] else ''} "
                                  f"{row['bytes'] / 1e6:.1f} MB" for row in parts)
                click.echo(f"  query encoders: {shown}")
            else:
                click.echo("  query encoders: none (searching needs torch and the weights; "
                           "add them with: mapclip encoders add DB)")
        for stage, reason, n in store.read_common_errors(conn, 10):
            click.echo(f"  {n} x {stage}: {reason}")
    except Exception as error:  # a damaged file: say so, no traceback
        raise click.ClickException(f"{db_path} cannot be read: {type(error).__name__}: {error}") from None
    finally:
        conn.close()


@cli.command("export-vectors")
@click.argument("db_path", type=click.Path(exists=True, dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--model", "model_name", help="Model name as in the models table (default: the default model).")
def export_vectors(db_path, output, model_name):
    """Write every vector to OUTPUT (.npz with arrays 'map_id' and 'embedding'), for numpy users.

    Load with: data = numpy.load(OUTPUT); data["embedding"]  # (N, dim) float32, unit rows
    """
    import numpy as np

    from . import store

    try:
        conn = store.open_collection_readonly(db_path)
    except (store.StoreError, store.ExtensionsUnavailable) as error:
        raise click.ClickException(str(error))
    try:
        model = store.pick_model(store.read_models(conn), model_name, where=db_path)
        ids, matrix = store.read_vectors(conn, model.vector_table, int(model.dim))
    except LookupError as error:
        raise click.ClickException(str(error))
    finally:
        conn.close()
    np.savez(output, map_id=ids, embedding=matrix)
    click.echo(f"{len(ids)} vectors of {matrix.shape[1] if len(ids) else 0} floats -> {output}", err=True)


@cli.command("publish-copy")
@click.argument("db_path", type=click.Path(exists=True, dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
def publish_copy(db_path, output):
    """Write OUTPUT: a copy of the collection to publish, without this machine's details.

    Local file locations become relative to the folder they were loaded from, the loads table loses
    host names, process ids and paths, and the kept-images table is emptied (re-embedding from the
    copy then needs the images again).  DB_PATH is only read; OUTPUT must not exist yet.
    """
    from . import store
    from .store.publishing import copy_for_publishing

    if Path(output).exists():
        raise click.ClickException(f"{output} exists: give a new file name (nothing was written)")
    try:
        store.open_collection_readonly(db_path).close()
    except (store.StoreError, store.ExtensionsUnavailable) as error:
        raise click.ClickException(str(error))
    try:
        done = copy_for_publishing(db_path, output)
    except Exception as error:  # a full disk, a damaged file: say so, and leave no half copy
        Path(output).unlink(missing_ok=True)
        raise click.ClickException(f"the copy could not be made: {type(error).__name__}: {error}") from None
    changes = ", ".join(f"{name} {count}" for name, count in done["changed"].items())
    click.echo(f"{output}: a copy to publish ({changes} rows changed; locations relative to "
               f"{done['root'] or 'nothing: no local files'})", err=True)


@cli.command("search")
@click.argument("db_path", type=click.Path(exists=True, dir_okay=False))
@click.argument("query", required=False)
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Search by this picture (or with QUERY).")
@click.option("--like", type=str, help="Maps like this stored map (its id).")
@click.option("--weight", type=str, help="Text against picture, -1 (picture only) to 1 (text only); default 0.")
@click.option("--term", "terms", multiple=True,
              help="A further term: TEXT, map:ID or image:FILE; repeat it. Weigh each with --term-weight.")
@click.option("--term-weight", "term_weights", multiple=True, help="The weight of each --term, in order (-1 to 1).")
@click.option("--more", multiple=True, help="More like this map id (repeat it).")
@click.option("--fewer", multiple=True, help="Fewer like this map id (repeat it).")
@click.option("--year-min", type=str, help="Only maps from this year on.")
@click.option("--year-max", type=str, help="Only maps up to this year.")
@click.option("--place", help="Only maps whose place contains this text.")
@click.option("--filter", "filter_text", help="Only maps whose catalogue record matches this full-text query.")
@click.option("--words", help="Only maps that print these words (read by `mapclip ocr`).")
@click.option("--fusion", type=click.Choice(["average", "standardised", "rrf"], case_sensitive=False),
              help="How several terms are ranked together: average (one averaged query vector, the default), "
                   "standardised (each term's similarity standardised over the collection, summed by weight) "
                   "or rrf (reciprocal rank fusion of each term's nearest maps).")
@click.option("--rank", "rank", type=click.Choice(["vector", "hybrid"], case_sensitive=False),
              help="hybrid: fuse the CLIP ranking with the full-text rankings of QUERY in the catalogue records "
                   "and in the words printed on the maps (reciprocal rank fusion).")
@click.option("-k", "k", type=str, help="Results per page (default 20, at most 200).")
@click.option("--page", type=str, help="Page of results (default 1).")
@click.option("--model", "model_name", help="Model name as in the models table (default: the default model).")
@click.option("--json", "as_json", is_flag=True, help="Print search.json's answer.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the results as CSV.")
@click.option("--sql", "show_sql", is_flag=True, help="Also print the SQL that reproduces the search.")
def search(db_path, query, image, like, weight, terms, term_weights, more, fewer, year_min, year_max, place,
           filter_text, words, fusion, rank, k, page, model_name, as_json, as_csv, show_sql):
    """Search a collection file, with no server: the same search as the plugin's page and search.json.

    \b
    Examples:
      mapclip search maps.db "nautical chart"
      mapclip search maps.db --image scan.jpg --year-max 1900 -k 10
      mapclip search maps.db "coast" --like 42 --weight 0.5 --json
      mapclip search maps.db --term "railroad map" --term "map:17" --term-weight 1 --term-weight -0.5
      mapclip search maps.db "nautical chart" --like 42 --fusion rrf
      mapclip search maps.db "Cape Fear" --rank hybrid
    """
    from . import store
    from .search.errors import SearchError
    from .search.local import Collection

    params = {"like": like, "weight": weight, "term": list(terms) or None, "term_weight": list(term_weights) or None,
              "more": ",".join(more) or None, "fewer": ",".join(fewer) or None, "year_min": year_min,
              "year_max": year_max, "place": place, "filter": filter_text, "words": words, "fusion": fusion, "rank": rank,
              "k": k, "page": page, "model": model_name}
    try:
        # one search: sqlite-vec answers at once; building the in-memory index would take longer
        with Collection(db_path, settings={"index": "off"}) as collection:
            answer = collection.search(query, image=image, **params)
    except (SearchError, store.StoreError, store.ExtensionsUnavailable) as error:
        raise click.ClickException(str(error))
    except (OSError, ValueError) as error:
        raise click.ClickException(f"{type(error).__name__}: {error}")
    if as_json:
        click.echo(json.dumps(answer, indent=2, default=str))
        return
    results = answer["results"]
    if as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(RESULT_COLUMNS)
        writer.writerows([result[column] for column in RESULT_COLUMNS] for result in results)
    else:
        for place, result in enumerate(results, start=1):
            year = result["year"] if result["year"] is not None else ""
            found_by = ("  [" + ", ".join(f"{name} #{at}" for name, at in result["ranks"].items()) + "]"
                        if result.get("ranks") else "")
            click.echo(f"{place:>3}  {result['similarity']:.4f}  {result['id']:>8}  {str(year):>5}  "
                       f"{_one_line(result['title'])}{found_by}")
        click.echo(f"{len(results)} maps, model {answer['model']}, searched with {answer['searched_with']}", err=True)
    if show_sql:
        click.echo(f"\n{answer['sql']}\n-- params: {json.dumps(answer['params'], default=str)}", err=True)


RESULT_COLUMNS = ("id", "similarity", "title", "date", "year", "place", "item_id", "sheet", "url", "image_url",
                  "thumbnail_url")


def _one_line(text, width: int = 90) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[:width - 1] + "…"


# What the serving install leaves out; a command that needs it says in one line what to install.
LOAD_EXTRA = ("torch", "torchvision", "open_clip", "onnx", "onnxscript")


def main():
    try:
        cli()
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in LOAD_EXTRA:
            raise
        click.echo(f"Error: this command needs {error.name}, which the serving install leaves out: "
                   "pip install 'datasette-mapclip[load]'", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
