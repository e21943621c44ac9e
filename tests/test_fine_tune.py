"""Fine-tuning end to end on a small demo collection with the tiny model: dataset, train,
resume after a kill, evaluate, register, and search the registered model through Datasette."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_MODEL, save_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    """48 demo maps (64 px, 8 kinds, a few multi-sheet items) loaded with the tiny model."""
    from click.testing import CliRunner

    from datasette_mapclip.cli import cli
    from fine_tune.demo.maps import generate_demo_collection

    folder = tmp_path_factory.mktemp("demo") / "maps"
    rows = generate_demo_collection(folder, count=48, size=64)
    db_path = tmp_path_factory.mktemp("db") / "maps.db"
    result = CliRunner().invoke(cli, ["load", "folder", str(db_path), str(folder), *model_args, "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    return db_path, folder, rows


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def build(collection, tmp_path_factory, seed=3, template="subjects"):
    from click.testing import CliRunner

    from datasette_mapclip.cli import cli

    out = tmp_path_factory.mktemp("pairs")
    result = CliRunner().invoke(cli, ["fine-tune", "dataset", str(collection[0]), str(out),
                                      "--caption-template", template, "--seed", str(seed)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def pairs_dir(collection, tmp_path_factory):
    return build(collection, tmp_path_factory)


def train_args(pairs_dir, out_dir, tiny_checkpoint, epochs, *extra):
    return ["fine-tune", "train", str(pairs_dir), str(out_dir), "--model", TINY_MODEL, "--checkpoint",
            tiny_checkpoint, "--epochs", str(epochs), "--lr", "5e-4", "--batch-size", "8", "--patience", "0",
            "--threads", "1", "--quiet", *extra]


@pytest.fixture(scope="module")
def trained(pairs_dir, tiny_checkpoint, tmp_path_factory):
    from click.testing import CliRunner

    from datasette_mapclip.cli import cli

    out = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(cli, train_args(pairs_dir, out, tiny_checkpoint, 3), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


# -- captions and dataset ----------------------------------------------------------------------

def test_captions_follow_the_seed_recipe_and_drop_missing_parts():
    from fine_tune.captions import TemplateError, render_caption, resolve_template

    seed = resolve_template("seed")
    full = {"format": "chart", "title": "Coast of Maine", "date": "1886", "place": "Maine",
            "notes": "Shows soundings in fathoms.", "subjects": '["Nautical charts", "Maine"]'}
    assert render_caption(full, seed) == "A chart of Coast of Maine from 1886, in Maine. Shows soundings in fathoms."
    sparse = {"format": None, "title": "Plan of Boston", "date": None, "place": "Massachusetts", "notes": None,
              "subjects": None}
    assert render_caption(sparse, seed) == "A map of Plan of Boston, in Massachusetts."
    assert render_caption({"title": "Untitled"}, seed) == "A map of Untitled."
    with_subjects = render_caption(full, resolve_template("subjects"))
    assert "Nautical charts, Maine." in with_subjects
    assert render_caption(full, "{title} ({date})") == "Coast of Maine (1886)"
    with pytest.raises(TemplateError):
        resolve_template("A {kind} of {title}")


def test_dataset_splits_by_item_reproducibly(collection, pairs_dir, tmp_path_factory):
    db_path, folder, rows = collection
    splits = {name: read_csv(pairs_dir / f"{name}.csv") for name in ("train", "validation", "test")}
    assert all(list(rows[0]) == ["map_id", "item_id", "image", "caption"] for rows in splits.values() if rows)
    assert sum(len(r) for r in splits.values()) == len(rows) == 48
    assert all(splits.values()), "every split has maps"
    items = {name: {r["item_id"] for r in split} for name, split in splits.items()}
    assert not items["train"] & items["validation"]
    assert not items["train"] & items["test"]
    assert not items["validation"] & items["test"]
    assert len(splits["train"]) > len(splits["validation"])
    # Multi-sheet items exist in the demo, and all their sheets sit in one split.
    sheets = {}
    for row in rows:
        sheets.setdefault(row["item_id"], 0)
        sheets[row["item_id"]] += 1
    assert max(sheets.values()) >= 2
    # Captions: the recipe, subjects included, never "None".
    by_file = {row["file"]: row for row in rows}
    for split in splits.values():
        for pair in split:
            assert "None" not in pair["caption"] and pair["caption"].startswith("A ")
            source = by_file[Path(pair["image"]).name]
            assert source["title"] in pair["caption"]
            assert source["subjects"].split(";")[0] in pair["caption"]
            assert Path(pair["image"]).is_file()
    description = json.loads((pairs_dir / "dataset.json").read_text())
    assert description["seed"] == 3 and description["template_name"] == "subjects"
    assert description["counts"] == {name: len(split) for name, split in splits.items()}
    # Same seed, same split; another seed, another split.
    again = build(collection, tmp_path_factory, seed=3)
    for name in splits:
        assert (again / f"{name}.csv").read_text() == (pairs_dir / f"{name}.csv").read_text()
    other = build(collection, tmp_path_factory, seed=4)
    assert (other / "test.csv").read_text() != (pairs_dir / "test.csv").read_text()


# -- loss -------------------------------------------------------------------------------------

def test_loss_applies_the_learned_scale_once():
    import torch
    import torch.nn.functional as F

    from fine_tune.loss import clamp_logit_scale, contrastive_loss

    aligned = torch.eye(8)
    assert contrastive_loss(aligned, aligned, torch.tensor(100.0)).item() < 1e-3
    # With scale 1 the logits are cosines: a perfectly aligned batch still has loss well above 0,
    # which a hidden extra 1/0.07 temperature would have driven to ~0.
    assert contrastive_loss(aligned, aligned, torch.tensor(1.0)).item() > 1.0
    torch.manual_seed(0)
    images = F.normalize(torch.randn(6, 16), dim=-1)
    texts = F.normalize(torch.randn(6, 16), dim=-1)
    scale = torch.tensor(14.3)
    logits = scale * images @ texts.T
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(contrastive_loss(images, texts, scale), expected)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.tensor(7.0))

    holder = Holder()
    clamp_logit_scale(holder)
    assert math.isclose(holder.logit_scale.exp().item(), 100.0, rel_tol=1e-5)


# -- training ---------------------------------------------------------------------------------

def test_train_writes_checkpoints_and_log_and_learns(trained):
    import torch

    from datasette_mapclip.model.clip import import_open_clip

    log = read_csv(trained / "train_log.csv")
    assert [int(r["epoch"]) for r in log] == [1, 2, 3]
    assert float(log[-1]["train_loss"]) < float(log[0]["train_loss"])
    assert all(float(r["val_loss"]) > 0 for r in log)
    assert sorted(p.name for p in trained.glob("epoch_*.pt")) == ["epoch_2.pt", "epoch_3.pt"]  # keep 2
    state = torch.load(trained / "epoch_3.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "epoch", "best_val_loss", "rng", "architecture", "args"} <= set(state)
    assert state["epoch"] == 3 and state["architecture"] == TINY_MODEL and state["finished"]
    # best.pt is a plain state_dict open_clip loads exactly.
    open_clip = import_open_clip()
    model, _, _ = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=str(trained / "best.pt"))
    best = torch.load(trained / "best.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best.items())
    assert json.loads((trained / "training.json").read_text())["architecture"] == TINY_MODEL


def test_rerun_after_finish_does_nothing(trained, pairs_dir, tiny_checkpoint, invoke):
    before = (trained / "best.pt").stat().st_mtime_ns
    result = invoke(train_args(pairs_dir, trained, tiny_checkpoint, 3))
    assert "already finished" in result.output
    assert (trained / "best.pt").stat().st_mtime_ns == before
    # Other settings in the same folder are refused, not mixed in.
    result = invoke(train_args(pairs_dir, trained, tiny_checkpoint, 3, "--seed", "9"), expect=1)
    assert "--restart" in result.output


def test_resume_after_kill_continues_and_matches_an_uninterrupted_run(pairs_dir, tiny_checkpoint, tmp_path, invoke):
    epochs = 6
    out = tmp_path / "killed"
    args = train_args(pairs_dir, out, tiny_checkpoint, epochs, "--batch-size", "4", "--keep-checkpoints", "0")
    process = subprocess.Popen([sys.executable, "-m", "datasette_mapclip.cli", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not (out / "epoch_1.pt").exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no epoch finished in 120 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()
    done = sorted(int(p.stem.split("_")[1]) for p in out.glob("epoch_*.pt"))
    assert done and done[-1] < epochs, f"killed too late: {done}"

    result = invoke(args)
    assert f"resuming after epoch {done[-1]}" in result.output
    log = read_csv(out / "train_log.csv")
    assert [int(r["epoch"]) for r in log] == list(range(1, epochs + 1))

    reference = tmp_path / "straight"
    invoke(train_args(pairs_dir, reference, tiny_checkpoint, epochs, "--batch-size", "4"))
    straight = read_csv(reference / "train_log.csv")
    np.testing.assert_allclose([float(r["train_loss"]) for r in log], [float(r["train_loss"]) for r in straight],
                               rtol=1e-3)


# -- evaluation -------------------------------------------------------------------------------

def test_random_baseline_and_ranks():
    from fine_tune.metrics import random_recall, ranks, retrieval_metrics

    assert random_recall(100, np.array([1]), 10) == pytest.approx(0.1)
    assert random_recall(10, np.array([2]), 1) == pytest.approx(0.2)
    similarity = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    relevant = np.array([[False, True, False], [False, False, True]])
    assert list(ranks(similarity, relevant)) == [3, 1]
    vectors = np.eye(4, dtype=np.float32)
    metrics = retrieval_metrics(vectors, vectors, ["a", "b", "c", "d"])
    assert metrics["text_to_image"]["R@1"] == 1.0 and metrics["image_to_text"]["median_rank"] == 1.0


def test_evaluate_writes_table_chart_and_sane_numbers(pairs_dir, trained, tmp_path, invoke):
    from PIL import Image

    out = tmp_path / "eval"
    result = invoke(["fine-tune", "evaluate", pairs_dir, "--checkpoint", trained / "best.pt", "--out", out, "--quiet"])
    markdown = (out / "evaluation.md").read_text()
    assert "| text -> image recall@10 |" in markdown and "| image -> text median rank |" in markdown
    assert "text -> image recall@10" in result.output
    with Image.open(out / "evaluation.png") as chart:
        assert chart.format == "PNG" and chart.size[0] > 100
        chart.verify()
    results = json.loads((out / "evaluation.json").read_text())
    assert results["models"]["base"] == f"{TINY_MODEL}/sha256:" + results["models"]["base"].split(":")[1]
    n = results["images"]
    for label in ("base", "fine-tuned"):
        for direction in ("text_to_image", "image_to_text"):
            metrics = results["retrieval"][label][direction]
            assert all(0 <= metrics[f"R@{k}"] <= 1 for k in (1, 5, 10))
            assert metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"]
            assert 1 <= metrics["median_rank"] <= n
    assert results["random"]["image_to_text"]["R@1"] == pytest.approx(1 / results["captions"])
    kinds = results["kinds"]
    assert kinds["collection_images"] == 48 and len(kinds["per_kind"]) == 8
    assert kinds["per_kind"]["nautical"]["query"] == "nautical chart"
    assert all(0 <= row["fine-tuned"] <= 1 for row in kinds["per_kind"].values())


# -- registration and search ------------------------------------------------------------------

@pytest.fixture
def registered(collection, trained, tmp_path, invoke):
    db_path = tmp_path / "maps.db"
    shutil.copy(collection[0], db_path)
    result = invoke(["fine-tune", "register", db_path, "--checkpoint", trained / "best.pt", "--default",
                     "--precision", "fp32", "--quiet"])
    return db_path, result


async def test_register_adds_a_searchable_model(registered, trained):
    from datasette.app import Datasette

    from datasette_mapclip.model.clip import file_sha256
    from datasette_mapclip.store import MapStore

    db_path, result = registered
    store = MapStore(db_path)
    models = store.models()
    assert len(models) == 2
    base, tuned = models
    assert tuned["checkpoint_sha256"] == file_sha256(trained / "best.pt")
    assert tuned["is_default"] == 1 and base["is_default"] == 0
    counts = [store.conn.execute(f"SELECT count(*) FROM [{m['vector_table']}]").fetchone()[0] for m in models]
    assert counts == [48, 48]
    assert store.counts()["maps"] == 48
    store.close()
    assert f"registered {tuned['name']} (default)" in result.output

    ds = Datasette([str(db_path)])
    unnamed = (await ds.client.get("/-/mapclip/search.json", params={"q": "nautical chart", "k": 3})).json()
    assert unnamed["model"] == tuned["name"] == MapStore(db_path).model()["name"]  # one rule for the default
    for model in (tuned, base):
        response = await ds.client.get("/-/mapclip/search.json", params={"q": "nautical chart", "k": 5,
                                                                          "model": model["name"]})
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["model"] == model["name"] and len(data["results"]) == 5


def test_every_option_has_help():
    import click

    from fine_tune.cli import fine_tune

    for name, command in fine_tune.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"fine-tune {name} {param.opts[0]} has no help"


# -- the temperature at the training call site -----------------------------------------------

def tiny_model(checkpoint, logit_scale=None):
    """(model, eval transform, tokenizer) of mapclip-tiny from a checkpoint, with exp(logit_scale) set."""
    import torch

    from datasette_mapclip.model.clip import import_open_clip

    open_clip = import_open_clip()
    model, _, transform = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=str(checkpoint))
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(logit_scale))
    return model, transform, open_clip.get_tokenizer(TINY_MODEL)


def loss_by_hand(model, pixels, tokens):
    """CLIP's loss written out: logits = exp(model.logit_scale) * cosines, cross-entropy both ways."""
    import torch
    import torch.nn.functional as F

    images = F.normalize(model.encode_image(pixels), dim=-1)
    texts = F.normalize(model.encode_text(tokens), dim=-1)
    logits = math.exp(model.logit_scale.item()) * images @ texts.T
    labels = torch.arange(len(pixels))
    return ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).item()


def test_training_step_uses_and_learns_the_models_logit_scale(tiny_checkpoint):
    import torch

    from fine_tune.loss import MAX_LOGIT_SCALE
    from fine_tune.train import batch_loss, freeze_tower, make_optimizer

    torch.manual_seed(0)
    model, _, tokenizer = tiny_model(tiny_checkpoint, logit_scale=3.7)  # neither 1/0.07 nor 100
    model.eval()  # no dropout: the same numbers twice
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    pixels = torch.randn(6, 3, size, size)
    tokens = tokenizer([f"A map of place number {i}" for i in range(6)])
    loss = batch_loss(model, pixels, tokens, "cpu")
    with torch.no_grad():
        expected = loss_by_hand(model, pixels, tokens)
        model.logit_scale.fill_(math.log(MAX_LOGIT_SCALE))
        at_100 = loss_by_hand(model, pixels, tokens)
        model.logit_scale.fill_(math.log(3.7))
    assert abs(expected - at_100) > 0.05  # the scale matters for this batch
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The temperature is learned: the loss reaches it, and one step moves it.
    freeze_tower(model, "text")  # it stays trainable whichever tower is frozen
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    optimizer.zero_grad()
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0
    optimizer.step()
    assert not math.isclose(model.logit_scale.exp().item(), 3.7, rel_tol=1e-4)


def test_training_run_reports_losses_at_the_learned_logit_scale(pairs_dir, tiny_checkpoint, tmp_path):
    """End to end: a run starting at exp(logit_scale) = 3 learns it, and its logged validation
    loss is the loss at the saved model's own scale, computed by hand."""
    import torch

    from fine_tune.dataset import read_split
    from fine_tune.pairs import ImageSource, collate, prepare_split
    from fine_tune.train import TrainOptions, image_size_of, train

    model, _, _ = tiny_model(tiny_checkpoint, logit_scale=3.0)
    start = tmp_path / "start.pt"
    torch.save(model.state_dict(), start)
    result = train(TrainOptions(str(pairs_dir), str(tmp_path / "run"), model=TINY_MODEL, pretrained=None,
                                checkpoint=str(start), epochs=1, batch_size=8, lr=5e-3, patience=0, threads=1,
                                augment=False, quiet=True), echo=lambda line: None)
    row = result.history[-1]
    trained, transform, tokenizer = tiny_model(tmp_path / "run" / "best.pt")
    trained.eval()
    assert row["logit_scale"] != 3.0  # learned, not a constant
    assert row["logit_scale"] == pytest.approx(trained.logit_scale.exp().item(), abs=1e-4)

    val = prepare_split(read_split(pairs_dir, "validation"), tokenizer, transform, ImageSource(image_size_of(trained)),
                        cache=True, workers=1, progress=False, deterministic=True, desc="")[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for pixels, tokens in torch.utils.data.DataLoader(val, batch_size=8, collate_fn=collate):
            if len(pixels) >= 2:
                total += loss_by_hand(trained, pixels, tokens) * len(pixels)
                count += len(pixels)
    assert count >= 2
    assert row["val_loss"] == pytest.approx(total / count, abs=1e-5)


# -- evaluate scores the models it names -------------------------------------------------------

def recall_by_hand(model, transform, tokenizer, pairs) -> dict:
    """Recall@1/5/10 and median rank of one model on (image, caption) pairs, from first principles:
    a caption finds its map when any image with that caption is within the top k; an image
    finds its caption among the distinct captions."""
    import torch
    import torch.nn.functional as F

    from fine_tune.pairs import ImageSource

    size = model.visual.image_size
    source = ImageSource(size[0] if isinstance(size, (tuple, list)) else size)
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([transform(source.load(p.image)) for p in pairs])
        images = F.normalize(model.encode_image(pixels), dim=-1).numpy()
        distinct = sorted({p.caption for p in pairs})
        texts = F.normalize(model.encode_text(tokenizer(distinct)), dim=-1).numpy()
    similarity = texts @ images.T  # (captions, images)
    t2i = []
    for c, caption in enumerate(distinct):
        mine = [i for i, p in enumerate(pairs) if p.caption == caption]
        best = max(similarity[c, i] for i in mine)
        t2i.append(1 + sum(similarity[c, i] > best for i in range(len(pairs)) if i not in mine))
    i2t = []
    for i, pair in enumerate(pairs):
        own = distinct.index(pair.caption)
        i2t.append(1 + sum(similarity[c, i] > similarity[own, i] for c in range(len(distinct)) if c != own))

    def summary(rank):
        return {**{f"R@{k}": sum(r <= k for r in rank) / len(rank) for k in (1, 5, 10)},
                "median_rank": float(np.median(rank))}

    return {"text_to_image": summary(t2i), "image_to_text": summary(i2t)}


def assert_same_metrics(got, expected):
    for direction in ("text_to_image", "image_to_text"):
        for metric, value in expected[direction].items():
            assert got[direction][metric] == pytest.approx(value, abs=1e-9), (direction, metric)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """Another mapclip-tiny: random weights from another seed."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("other") / "other.pt", seed=98765)


def test_evaluate_scores_exactly_the_models_it_names(pairs_dir, trained, tiny_checkpoint, other_checkpoint, tmp_path):
    from fine_tune.dataset import read_split
    from fine_tune.evaluate import evaluate

    split = "train"  # the largest split: the three models score differently on it
    pairs = read_split(pairs_dir, split)
    by_hand = {name: recall_by_hand(*tiny_model(path), pairs) for name, path in
               {"tuned": trained / "best.pt", "start": tiny_checkpoint, "other": other_checkpoint}.items()}
    assert by_hand["tuned"] != by_hand["start"] != by_hand["other"] != by_hand["tuned"]  # the test can tell them apart

    def run(checkpoint, out, **kwargs):
        return evaluate(str(pairs_dir), str(checkpoint), out_dir=str(tmp_path / out), split=split, workers=1,
                        progress=False, echo=lambda text: None, **kwargs)

    # Defaults: fine-tuned = the checkpoint, base = where training.json says the run started.
    results = run(trained / "best.pt", "default")
    assert_same_metrics(results["retrieval"]["fine-tuned"], by_hand["tuned"])
    assert_same_metrics(results["retrieval"]["base"], by_hand["start"])
    # Another base, then another checkpoint: each column follows the model it names.
    results = run(trained / "best.pt", "other-base", base_checkpoint=str(other_checkpoint))
    assert_same_metrics(results["retrieval"]["fine-tuned"], by_hand["tuned"])
    assert_same_metrics(results["retrieval"]["base"], by_hand["other"])
    results = run(other_checkpoint, "other-tuned", model=TINY_MODEL, base_checkpoint=str(tiny_checkpoint))
    assert_same_metrics(results["retrieval"]["fine-tuned"], by_hand["other"])
    assert_same_metrics(results["retrieval"]["base"], by_hand["start"])


def test_evaluate_base_of_a_run_from_scratch_is_its_seeded_initialisation(pairs_dir, other_checkpoint, tmp_path):
    """A run with no starting weights (pretrained none, or None from Python) is compared with
    the random initialisation it started from, never with downloaded 'openai' weights."""
    from datasette_mapclip.model.clip import import_open_clip
    from fine_tune.dataset import read_split
    from fine_tune.evaluate import evaluate
    from fine_tune.train import seed_everything

    open_clip = import_open_clip()
    seed_everything(5)
    start, _, transform = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=None)
    expected = recall_by_hand(start, transform, open_clip.get_tokenizer(TINY_MODEL), read_split(pairs_dir, "train"))
    for pretrained in ("none", None):
        run = tmp_path / f"run-{pretrained}"
        run.mkdir()
        shutil.copy(other_checkpoint, run / "best.pt")
        (run / "training.json").write_text(json.dumps({
            "architecture": TINY_MODEL, "start": {"pretrained": pretrained, "checkpoint": None},
            "args": {"seed": 5}}))
        results = evaluate(str(pairs_dir), str(run / "best.pt"), split="train", workers=1, progress=False,
                           echo=lambda text: None)
        assert results["models"]["base"] == f"{TINY_MODEL}/random-init-seed-5", pretrained
        assert_same_metrics(results["retrieval"]["base"], expected)
