"""``mapclip fine-tune``: dataset, train, evaluate, register.

The usual sequence, on a collection already loaded with ``mapclip load``:

    mapclip fine-tune dataset maps.db pairs/ --caption-template subjects
    mapclip fine-tune train pairs/ run/ --model ViT-B-32 --pretrained openai
    mapclip fine-tune evaluate pairs/ --checkpoint run/best.pt
    mapclip fine-tune register maps.db --checkpoint run/best.pt --default
"""

from __future__ import annotations

import sys

import click

from datasette_mapclip.model.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED

from .captions import FIELDS, TEMPLATES
from .dataset import DEFAULT_FRACTIONS


@click.group("fine-tune")
def fine_tune():
    """Fine-tune CLIP on the collection's own catalogue captions, measure it, and re-embed with it."""


@fine_tune.command("dataset")
@click.argument("db_path", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--caption-template", default="seed", show_default=True,
              help=f"A preset ({', '.join(f'{k}: {v!r}' for k, v in TEMPLATES.items())}) or a Python format "
                   f"string using {', '.join('{' + f + '}' for f in FIELDS)}. Missing fields are dropped "
                   "with the words before them.")
@click.option("--split", "fractions", nargs=3, type=float, default=DEFAULT_FRACTIONS, show_default=True,
              help="Train, validation and test fractions (of maps; whole items go to one split).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the item shuffle: same seed, same split.")
def dataset_command(db_path, out_dir, caption_template, fractions, seed):
    """Write OUT_DIR/train.csv, validation.csv, test.csv (map_id, item_id, image, caption)
    and dataset.json from the maps of DB_PATH, split by item. Where a load kept an image
    (--keep-images), `image` is the kept file, so training never fetches it again.

    Example: mapclip fine-tune dataset maps.db pairs/ --caption-template subjects
    """
    from .captions import TemplateError
    from .dataset import DatasetError, build_dataset

    try:
        summary = build_dataset(db_path, out_dir, template=caption_template, fractions=fractions, seed=seed)
    except (DatasetError, TemplateError) as error:
        raise click.ClickException(str(error))
    click.echo(f"{summary.line()} -> {out_dir}", err=True)


@fine_tune.command("train")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True,
              help="open_clip architecture to train (e.g. ViT-B-32, mapclip-tiny).")
@click.option("--pretrained", default=DEFAULT_PRETRAINED, show_default=True,
              help="open_clip pretrained tag to start from; 'none' trains from a seeded random initialisation.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Start from this state_dict file instead (overrides --pretrained).")
@click.option("--epochs", type=int, default=10, show_default=True, help="Number of passes over the training split.")
@click.option("--batch-size", type=int, default=32, show_default=True,
              help="Pairs per step; each pair's negatives are the other pairs of its batch.")
@click.option("--lr", type=float, default=1e-5, show_default=True,
              help="Peak learning rate (AdamW). ~1e-5 to fine-tune pretrained weights; ~1e-3 from scratch.")
@click.option("--warmup-steps", type=int, default=None,
              help="Linear warm-up steps before the cosine decay (default: 10% of all steps).")
@click.option("--weight-decay", type=float, default=0.1, show_default=True,
              help="AdamW weight decay (not applied to biases, norms and the temperature).")
@click.option("--freeze", type=click.Choice(["none", "image", "text"]), default="none", show_default=True,
              help="Keep one tower's weights fixed.")
@click.option("--patience", type=int, default=3, show_default=True,
              help="Stop after this many epochs without a better validation loss (0: never stop early).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for initialisation, shuffling and augmentation (a resumed run repeats them).")
@click.option("--device", help="torch device; default cuda if available, else cpu.")
@click.option("--workers", type=int, default=0, show_default=True,
              help="Processes reading and decoding images (DataLoader workers; 0: in the main process, best when "
                   "images are cached in RAM).")
@click.option("--threads", type=int, help="CPU threads for torch (default: all cores).")
@click.option("--cache", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Keep decoded images in RAM (auto: when they fit in ~4 GB).")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="open_clip's random-crop train transform, or the deterministic eval transform.")
@click.option("--keep-checkpoints", type=int, default=2, show_default=True,
              help="Keep the newest N epoch_N.pt files (0: all). best.pt is always kept.")
@click.option("--restart", is_flag=True, help="Ignore (delete) epoch checkpoints in OUT_DIR and start over.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_command(dataset_dir, out_dir, model_name, **options):
    """Train on DATASET_DIR (from `fine-tune dataset`) and write checkpoints into OUT_DIR.

    Rerunning the same command after an interruption resumes from the last completed epoch.
    OUT_DIR/best.pt is a plain state_dict: use it anywhere with --model ARCH --checkpoint best.pt.

    Example: mapclip fine-tune train pairs/ run/ --model ViT-B-32 --pretrained openai --epochs 5
    """
    from .train import TrainingError, TrainOptions, train

    try:
        result = train(TrainOptions(dataset_dir=dataset_dir, out_dir=out_dir, model=model_name, **options),
                       echo=lambda line: click.echo(line, err=True))
    except TrainingError as error:
        raise click.ClickException(str(error))
    click.echo(result.summary(), err=True)
    if result.status == "interrupted":
        sys.exit(130)
    if result.best_epoch:
        click.echo(f"next: mapclip fine-tune evaluate {dataset_dir} --checkpoint {result.out_dir / 'best.pt'}",
                   err=True)


@fine_tune.command("evaluate")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The fine-tuned weights (e.g. run/best.pt).")
@click.option("--model", "model_name",
              help="Architecture of --checkpoint (default: read from training.json beside it).")
@click.option("--base-model", help="Architecture of the model to compare with (default: the same).")
@click.option("--base-pretrained",
              help="Pretrained tag of the base model, or 'none' for the seeded random initialisation "
                   "(default: what training started from).")
@click.option("--base-checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="A state_dict file for the base model instead of a tag.")
@click.option("--split", type=click.Choice(["test", "validation", "train"]), default="test", show_default=True,
              help="Which split to measure on.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for evaluation.md, .json and .png (default: the checkpoint's folder).")
@click.option("--device", help="torch device; default cuda if available, else cpu.")
@click.option("--workers", type=int, default=4, show_default=True, help="Threads reading and decoding images.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate_command(dataset_dir, checkpoint, model_name, base_model, base_pretrained, base_checkpoint, split,
                     out_dir, device, workers, quiet):
    """Recall@1/5/10 and median rank (text->image, image->text) of the base and fine-tuned
    models on DATASET_DIR's test split, beside a random ranking.

    Example: mapclip fine-tune evaluate pairs/ --checkpoint run/best.pt
    """
    from .evaluate import EvaluationError, evaluate

    try:
        results = evaluate(dataset_dir, checkpoint, model=model_name, base_model=base_model,
                           base_pretrained=base_pretrained, base_checkpoint=base_checkpoint, out_dir=out_dir,
                           split=split, device=device, workers=workers, progress=not quiet, echo=click.echo)
    except EvaluationError as error:
        raise click.ClickException(str(error))
    click.echo(f"written: {', '.join(results['files'])}", err=True)


def _encoding_options(command):
    """--device, --precision, --threads, --batch-size, --workers and --quiet, as the load commands have them."""
    from loaders.cli import ENCODING_OPTIONS, quiet_option

    for option in reversed([*ENCODING_OPTIONS, quiet_option]):
        command = option(command)
    return command


def _engine_options(command):
    """--engine, --ray-address, --actors and --keep-images, as the load commands have them."""
    from loaders.cli import engine_option_list, keep_images_option

    for option in reversed(engine_option_list()):
        command = option(command)
    return keep_images_option(command)


@fine_tune.command("register")
@click.argument("db_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The fine-tuned weights to embed the collection with (e.g. run/best.pt).")
@click.option("--model", "model_name",
              help="Architecture of --checkpoint (default: read from training.json beside it).")
@click.option("--default", "make_default", is_flag=True,
              help="Make the new model the collection's default for search.")
@_encoding_options
@_engine_options
def register_command(db_path, checkpoint, model_name, make_default, device, precision, threads, batch_size,
                     workers, no_encoders, fp32_encoders, quiet, engine, ray_address, actors, keep_images):
    """Re-embed every map of DB_PATH with a fine-tuned checkpoint, into a new vector table beside
    the existing ones. Images kept by a load (--keep-images) are read from their files; the others
    from their stored location. Rerunning resumes.

    Example: mapclip fine-tune register maps.db --checkpoint run/best.pt --default
    """
    from datasette_mapclip.model import iiif
    from datasette_mapclip.model.clip import ModelSpec, ModelUnavailable, load_encoder
    from datasette_mapclip.runtime import set_torch_threads
    from datasette_mapclip.store import ExtensionsUnavailable, MapStore
    from loaders.cli import keep_images_or_exit, ray_engine_or_exit, spec_or_exit
    from loaders.ray_engine import RayUnavailable

    from .register import architecture_for, register

    model_name = model_name or architecture_for(checkpoint)
    if not model_name:
        raise click.UsageError("--model is needed: no training.json beside the checkpoint says which architecture")
    keep = keep_images_or_exit(keep_images, iiif.DEFAULT_SIZE)
    encoder = spec = ray_options = None
    if engine == "ray":
        ray_engine = ray_engine_or_exit()
        spec = spec_or_exit(model_name, None, checkpoint)
        ray_options = ray_engine.RayOptions(address=ray_address, actors=actors, threads=threads)
    else:
        set_torch_threads(threads)
    try:
        if engine != "ray":
            encoder = load_encoder(ModelSpec(model_name, None, checkpoint), device=device, precision=precision)
        store = MapStore(db_path)
    except (ModelUnavailable, ExtensionsUnavailable) as error:
        raise click.ClickException(str(error))
    if encoder is not None:
        click.echo(f"model {encoder.name} ({encoder.precision} on {encoder.device}), database {db_path}", err=True)
    try:
        summary, model, missing = register(
            store, encoder, default=make_default, batch_size=batch_size, workers=workers, progress=not quiet,
            keep=keep, spec=spec, engine=engine, ray_options=ray_options, device=device, precision=precision,
            echo=lambda line: click.echo(f"{line}, database {db_path}", err=True))
    except RayUnavailable as error:
        raise click.ClickException(str(error))
    click.echo(summary.line(), err=True)
    if summary.status == "finished" and not no_encoders:
        from loaders.query_encoders import after_embedding

        after_embedding(store, encoder, model.name, lambda line: click.echo(line, err=True), int8=not fp32_encoders)
    store.close()
    if missing:
        click.echo(f"{missing} maps have no stored location and were not re-embedded", err=True)
    if summary.status != "finished":
        sys.exit(130 if summary.status == "interrupted" else 2)
    default = " (default)" if model.is_default else ""
    click.echo(f"registered {model.name}{default} in {model.vector_table}; "
               f"search it with model={model.name}", err=True)
