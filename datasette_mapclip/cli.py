"""``mapclip``: the one command root, database path first (as sqlite-utils does).

The commands that need only the store live here (``info``, ``export-vectors``).  The command
groups of the other packages (``load``, ``import-beto`` and ``loc-metadata`` from ``loaders``;
``fine-tune`` and ``demo`` from ``fine_tune``) join through the ``mapclip.commands`` entry points
declared in setup.py, so this core package never imports them: dependencies point one way
(fine_tune -> loaders -> datasette_mapclip).
"""

from __future__ import annotations

from importlib.metadata import entry_points

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
    """Counts, models (provenance) and the most common load errors of a database."""
    store = open_store(db_path)
    counts = store.counts()
    click.echo(f"{counts['maps']} maps in {counts['items']} items, {counts['load_errors']} load errors")
    for model in store.models():
        default = " (default)" if model.is_default else ""
        click.echo(f"model {model['name']}{default}: {store.vector_count(model)} vectors of {model['dim']} floats "
                   f"in {model['vector_table']}, open_clip {model['open_clip_version']}, "
                   f"sqlite-vec {model['sqlite_vec_version']}")
    for stage, reason, n in store.common_errors(10):
        click.echo(f"  {n} x {stage}: {reason}")
    store.close()


@cli.command("export-vectors")
@click.argument("db_path", type=click.Path(exists=True, dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--model", "model_name", help="Model name as in the models table (default: the default model).")
def export_vectors(db_path, output, model_name):
    """Write every vector to OUTPUT (.npz with arrays 'map_id' and 'embedding'), for numpy users.

    Load with: data = numpy.load(OUTPUT); data["embedding"]  # (N, dim) float32, unit rows
    """
    import numpy as np

    store = open_store(db_path)
    try:
        ids, matrix = store.vectors(model_name)
    except LookupError as error:
        raise click.ClickException(str(error))
    finally:
        store.close()
    np.savez(output, map_id=ids, embedding=matrix)
    click.echo(f"{len(ids)} vectors of {matrix.shape[1] if len(ids) else 0} floats -> {output}", err=True)


def main():
    cli()


if __name__ == "__main__":
    main()
