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


def ensure_model(workdir: Path) -> Path:
    """A checkpoint for the demo model (see fine_tune for how it is trained)."""
    checkpoint = workdir / "model" / "demo-model.pt"
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
    checkpoint = ensure_model(workdir)
    db_path = workdir / "demo.db"
    cli.main(["load", "folder", str(db_path), str(collection), "--model", DEMO_MODEL,
              "--checkpoint", str(checkpoint), "--precision", "fp32"], standalone_mode=False)
    from datasette_mapclip.store import MapStore

    model_name = MapStore(db_path).model()["name"]
    how = "with random weights (not trained yet: results are arbitrary)"
    (workdir / "metadata.yml").write_text(demo_metadata(model_name, how))
    url = f"http://127.0.0.1:{port}/-/mapclip"
    if no_serve:
        click.echo(f"demo ready: datasette serve {db_path} -m {workdir / 'metadata.yml'}", err=True)
        return
    click.echo(f"\nServing the demo at {url}  (Ctrl-C to stop)\n", err=True)
    subprocess.run([sys.executable, "-m", "datasette", "serve", "-i", str(db_path),
                    "-m", str(workdir / "metadata.yml"), "-p", str(port)])


if __name__ == "__main__":
    main()
