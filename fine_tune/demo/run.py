"""The offline demo: draw a map collection, train a small CLIP model on it, load it, serve it.

    python -m fine_tune.demo [DIR] [--port 8001] [--no-serve]     (or: mapclip demo [DIR])

Everything happens under DIR (default ./demo): the images, the model checkpoint, demo.db and a
metadata.yml that tells visitors which model they are using.  Steps already done are skipped,
so a second run starts the server at once.  It drives the same Python API as the commands:
``loaders.pipeline.run_load`` and the ``fine_tune`` dataset, train, evaluate and register steps.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

DEMO_MODEL = "mapclip-tiny"


def demo_metadata(model_name: str, how: str) -> str:
    return f"""title: datasette-mapclip demo collection
description_html: |-
  <p>360 procedurally drawn maps of eight kinds (relief maps, political maps, city street plans,
  nautical charts, choropleth maps, manuscript maps, geological maps, fire insurance plans) with
  catalogue-style records. Try the <a href="/-/mapclip?q=nautical+chart">map search</a>.</p>
plugins:
  datasette-mapclip:
    model_note: >-
      This demo uses {model_name}, a small CLIP model {how}, so it runs offline. Real collections use real CLIP weights
      (--model ViT-B-32 --pretrained openai), which mapclip fetches where the network allows.
databases:
  demo:
    tables:
      map_vectors:
        hidden: true
"""


def ensure_collection(folder: Path) -> Path:
    from .maps import generate_demo_collection

    if not (folder / "metadata.csv").exists():
        click.echo(f"drawing the demo collection into {folder} ...", err=True)
        generate_demo_collection(folder, count=360, size=256)
    return folder


def random_start(workdir: Path) -> Path:
    """A seeded random mapclip-tiny: the base the demo model is trained from (and compared with)."""
    checkpoint = workdir / "model" / "random-start.pt"
    if checkpoint.exists():
        return checkpoint
    import torch

    from datasette_mapclip.model import import_open_clip

    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    open_clip = import_open_clip()
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(DEMO_MODEL, pretrained=None)
    torch.save(model.state_dict(), checkpoint)
    return checkpoint


def tiny_encoder(checkpoint: Path):
    from datasette_mapclip.model import ModelSpec, load_encoder

    return load_encoder(ModelSpec(DEMO_MODEL, None, str(checkpoint)), precision="fp32")


def check(summary, step: str):
    """Stop the demo when a step did not finish (the reason is in the summary line)."""
    if summary.status != "finished":
        raise click.ClickException(f"{step} did not finish: {summary.line()}")


# The recipe that trains the demo model (fine_tune's defaults are for real CLIP weights).
TRAINING = {"model": DEMO_MODEL, "pretrained": "none", "epochs": 30, "lr": 5e-4, "batch_size": 32,
            "patience": 0, "seed": 0}


def build(workdir: Path) -> Path:
    """Every step of the demo under ``workdir``; returns the database path."""
    from datasette_mapclip.store import MapStore
    from loaders.pipeline import run_load
    from loaders.sources.folder import folder_records

    from ..dataset import build_dataset
    from ..evaluate import evaluate
    from ..register import register
    from ..train import TrainingError, TrainOptions, train

    workdir.mkdir(parents=True, exist_ok=True)
    collection = ensure_collection(workdir / "collection")
    db_path = workdir / "demo.db"
    pairs_dir, model_dir = workdir / "pairs", workdir / "model"
    click.echo("1/4 loading the collection with an untrained model (fills the catalogue tables)", err=True)
    store = MapStore(db_path)
    records = list(folder_records(collection))
    check(run_load(store, tiny_encoder(random_start(workdir)), records, command=f"demo: load folder {collection}",
                   store_thumbnails=True, total=len(records)), "loading the collection")
    click.echo("2/4 map-caption pairs from the catalogue, split by item", err=True)
    if not (pairs_dir / "dataset.json").exists():
        click.echo(build_dataset(db_path, pairs_dir, template="subjects").line(), err=True)
    click.echo("3/4 training the demo model (about a minute on 2 CPU cores)", err=True)
    try:
        result = train(TrainOptions(dataset_dir=str(pairs_dir), out_dir=str(model_dir), **TRAINING),
                       echo=lambda line: click.echo(line, err=True))
    except TrainingError as error:
        raise click.ClickException(str(error))
    click.echo(result.summary(), err=True)
    if not (model_dir / "evaluation.md").exists():
        evaluate(str(pairs_dir), str(model_dir / "best.pt"), out_dir=str(model_dir), echo=click.echo)
    click.echo("4/4 embedding the collection with the trained model", err=True)
    summary, model, _ = register(store, tiny_encoder(model_dir / "best.pt"), default=True)
    check(summary, "embedding with the trained model")
    how = "trained from scratch on this demo collection by mapclip fine-tune (see demo/model/evaluation.md)"
    (workdir / "metadata.yml").write_text(demo_metadata(model["name"], how))
    store.close()
    click.echo((model_dir / "evaluation.md").read_text(), err=True)
    return db_path


@click.command("demo")
@click.argument("workdir", default="demo", type=click.Path(file_okay=False))
@click.option("--port", default=8001, show_default=True, help="Port for datasette serve.")
@click.option("--no-serve", is_flag=True, help="Build everything, do not start the server.")
def demo_command(workdir, port, no_serve):
    """Build and serve the offline demo under WORKDIR: draw 360 maps, train a small CLIP on their
    catalogue captions, embed them with it and serve the search page."""
    workdir = Path(workdir)
    db_path = build(workdir)
    if no_serve:
        click.echo(f"demo ready: datasette serve {db_path} -m {workdir / 'metadata.yml'}", err=True)
        return
    click.echo(f"\nServing the demo at http://127.0.0.1:{port}/-/mapclip  (Ctrl-C to stop)\n", err=True)
    subprocess.run([sys.executable, "-m", "datasette", "serve", "-i", str(db_path),
                    "-m", str(workdir / "metadata.yml"), "-p", str(port)])
