"""The offline demo: draw a map collection, get a small CLIP model for it, load it, serve it.

    python -m loaders.demo [DIR] [--port 8001] [--no-serve]

Everything happens under DIR (default ./demo): the images, the model checkpoint, demo.db and a
metadata.yml that tells visitors which model they are using.  Steps already done are skipped,
so a second run starts the server at once.
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
    from .sources.demo import generate_demo_collection

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

    from datasette_mapclip.model import _import_open_clip

    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    open_clip = _import_open_clip()
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(DEMO_MODEL, pretrained=None)
    torch.save(model.state_dict(), checkpoint)
    return checkpoint


def run(cli, *args):
    """Run a mapclip command in this process, stopping the demo if it fails."""
    cli.main([str(a) for a in args], standalone_mode=False)


# The recipe that trained the demo model (fine_tune's defaults are for real CLIP weights).
TRAINING = ["--model", DEMO_MODEL, "--pretrained", "none", "--epochs", "30", "--lr", "5e-4",
            "--batch-size", "32", "--patience", "0", "--seed", "0"]
@click.command()
@click.argument("workdir", default="demo", type=click.Path(file_okay=False))
@click.option("--port", default=8001, show_default=True, help="Port for datasette serve.")
@click.option("--no-serve", is_flag=True, help="Build everything, do not start the server.")
def main(workdir, port, no_serve):
    """Build and serve the offline demo under WORKDIR."""
    from .cli import cli

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    collection = ensure_collection(workdir / "collection")
    db_path = workdir / "demo.db"
    model_dir = workdir / "model"
    click.echo("1/4 loading the collection with an untrained model (fills the catalogue tables)", err=True)
    run(cli, "load", "folder", db_path, collection, "--model", DEMO_MODEL, "--checkpoint", random_start(workdir),
        "--precision", "fp32")
    click.echo("2/4 map-caption pairs from the catalogue, split by item", err=True)
    if not (workdir / "pairs" / "dataset.json").exists():
        run(cli, "fine-tune", "dataset", db_path, workdir / "pairs", "--caption-template", "subjects")
    click.echo("3/4 training the demo model (about a minute on 2 CPU cores)", err=True)
    run(cli, "fine-tune", "train", workdir / "pairs", model_dir, *TRAINING)
    if not (model_dir / "evaluation.md").exists():
        run(cli, "fine-tune", "evaluate", workdir / "pairs", "--checkpoint", model_dir / "best.pt", "--out", model_dir)
    click.echo("4/4 embedding the collection with the trained model", err=True)
    run(cli, "fine-tune", "register", db_path, "--checkpoint", model_dir / "best.pt", "--model", DEMO_MODEL, "--default")
    from datasette_mapclip.store import MapStore

    model_name = MapStore(db_path).model()["name"]
    how = "trained from scratch on this demo collection by mapclip fine-tune (see demo/model/evaluation.md)"
    (workdir / "metadata.yml").write_text(demo_metadata(model_name, how))
    click.echo((model_dir / "evaluation.md").read_text(), err=True)
    url = f"http://127.0.0.1:{port}/-/mapclip"
    if no_serve:
        click.echo(f"demo ready: datasette serve {db_path} -m {workdir / 'metadata.yml'}", err=True)
        return
    click.echo(f"\nServing the demo at {url}  (Ctrl-C to stop)\n", err=True)
    subprocess.run([sys.executable, "-m", "datasette", "serve", "-i", str(db_path),
                    "-m", str(workdir / "metadata.yml"), "-p", str(port)])


if __name__ == "__main__":
    main()
