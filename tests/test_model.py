import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, draw_map
from datasette_mapclip.model.clip import ModelSpec, ModelUnavailable, load_encoder


def test_encoder_outputs_unit_vectors_for_images_and_text(tiny_encoder):
    images = tiny_encoder.encode_images([draw_map(1), draw_map(2)])
    texts = tiny_encoder.encode_texts(["a nautical chart", "a city street plan"])
    assert images.shape == (2, 64) and texts.shape == (2, 64)
    assert images.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    assert not np.allclose(images[0], images[1])


def test_provenance_names_the_checkpoint_by_hash(tiny_encoder, tiny_checkpoint):
    provenance = tiny_encoder.provenance()
    assert provenance["architecture"] == TINY_MODEL and provenance["dim"] == 64
    assert len(provenance["checkpoint_sha256"]) == 64
    assert provenance["name"] == f"{TINY_MODEL}/sha256:{provenance['checkpoint_sha256'][:12]}"
    assert provenance["open_clip_version"]


def test_int8_stays_within_cosine_0999_of_fp32(tiny_checkpoint, tiny_encoder):
    int8 = load_encoder(ModelSpec(TINY_MODEL, None, tiny_checkpoint), precision="int8")
    pixels = torch.stack([tiny_encoder.preprocess(draw_map(i)) for i in range(8)])
    fast = int8.encode_image_tensors(pixels)
    assert int8.precision == "int8" and int8.int8_min_cosine >= 0.999
    exact = tiny_encoder.encode_image_tensors(pixels)
    assert (fast * exact).sum(axis=1).min() >= 0.999
    assert not np.array_equal(fast, exact)  # it really is another numeric path


@pytest.mark.parametrize(
    "spec,message",
    [
        (ModelSpec("ViT-Nope-99", "openai"), "unknown open_clip architecture"),
        (ModelSpec("ViT-B-32", "no-such-tag"), "no pretrained weights 'no-such-tag'"),
        (ModelSpec(TINY_MODEL, None, "/nonexistent/weights.pt"), "checkpoint file not found"),
    ],
)
def test_model_errors_say_what_is_wrong(spec, message):
    with pytest.raises(ModelUnavailable, match=message):
        load_encoder(spec)


def test_checkpoint_for_the_wrong_architecture_is_explained(tiny_checkpoint):
    with pytest.raises(ModelUnavailable, match="could not load checkpoint .* into RN50"):
        load_encoder(ModelSpec("RN50", None, tiny_checkpoint), precision="fp32")


def test_missing_weights_offline_give_advice_not_a_traceback(tmp_path):
    # HF_HUB_OFFLINE: the hub library only looks in its (empty) cache, so no outside host is contacted.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "datasette_mapclip.cli", "load", "folder", str(tmp_path / "m.db"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "could not get the ViT-B-32 'openai' weights" in result.stderr
    assert "--checkpoint PATH" in result.stderr


def test_trimmed_text_encoding_equals_open_clip_encode_text(tiny_encoder):
    from datasette_mapclip.model.clip import encode_text_trimmed

    texts = ["nautical chart", "a hand-coloured county map of Vermont from 1850 with roads and rivers", "x"]
    tokens = tiny_encoder.tokenizer(texts)
    with torch.no_grad():
        full = tiny_encoder.model.encode_text(tokens)
        trimmed = encode_text_trimmed(tiny_encoder.model, tokens)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
    assert int(tokens.argmax(dim=-1).max()) + 1 < tokens.shape[1]  # it really did skip padding


def test_int8_that_drifts_falls_back_to_fp32(tiny_checkpoint, tiny_encoder, monkeypatch):
    import datasette_mapclip.model.clip as model_module

    monkeypatch.setattr(model_module, "MIN_COSINE_TO_FP32", 1.000001)  # no int8 output can pass this
    int8 = load_encoder(ModelSpec(TINY_MODEL, None, tiny_checkpoint), precision="int8")
    pixels = torch.stack([tiny_encoder.preprocess(draw_map(i)) for i in range(6)])
    with pytest.warns(UserWarning, match="using fp32"):
        first = int8.encode_image_tensors(pixels)
    assert int8.precision == "fp32"
    np.testing.assert_allclose(first, tiny_encoder.encode_image_tensors(pixels), atol=1e-5)
    np.testing.assert_allclose(int8.encode_image_tensors(pixels), first, atol=1e-6)



def test_loading_weights_skips_random_initialisation_and_changes_no_number(tiny_checkpoint, monkeypatch):
    """Random initial weights are not drawn for a model whose checkpoint sets every weight (a
    second of ViT-B-32's start-up), and the loaded model encodes exactly as one built the usual way."""
    import contextlib

    from datasette_mapclip.model import clip as model_module

    spec = ModelSpec("mapclip-tiny", None, tiny_checkpoint)
    draws = {"uniform_": 0, "normal_": 0}  # every random fill of torch.nn.init ends in one of these

    def counting(name):
        draw = getattr(torch.Tensor, name)

        def counted(*args, **kwargs):
            draws[name] += 1
            return draw(*args, **kwargs)
        return counted

    for name in draws:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    quick = load_encoder(spec, device="cpu", precision="fp32")
    # nothing drawn while the model was built: not through torch.nn.init's functions, nor through
    # the copies modules imported by name (MultiheadAttention's xavier_uniform_)
    assert draws == {"uniform_": 0, "normal_": 0}
    torch.nn.MultiheadAttention(8, 2)  # and torch's own initialisation is back afterwards
    assert draws["uniform_"] > 0

    monkeypatch.setattr(model_module, "weights_come_later", contextlib.nullcontext)
    usual = load_encoder(spec, device="cpu", precision="fp32")
    assert draws["normal_"] > 0  # the usual way draws them
    texts = ["a nautical chart", "fire insurance plan of a town"]
    assert np.array_equal(quick.encode_texts(texts), usual.encode_texts(texts))
    images = [draw_map(3), draw_map(4)]
    assert np.array_equal(quick.encode_images(images), usual.encode_images(images))
    for (name, a), (_, b) in zip(quick.model.named_buffers(), usual.model.named_buffers()):
        assert torch.equal(a, b), name  # buffers built in code (attention masks) are the same


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


def meanwhile_in_this_thread(context, in_context, meanwhile):
    """Run ``in_context()`` in another thread inside ``context()``, and ``meanwhile()`` here while it
    is there; returns (what in_context returned, what meanwhile returned)."""
    import threading

    inside, release, seen = threading.Event(), threading.Event(), {}

    def other():
        with context():
            seen["in context"] = in_context()
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert inside.wait(10)
        here = meanwhile()
    finally:
        release.set()
        thread.join()
    return seen["in context"], here


def test_skipping_random_weights_touches_only_the_thread_that_loads_a_checkpoint():
    """A server's model thread skips initial fills while it loads a checkpoint; a model built at the
    same moment in another thread (a fine-tune, a test fixture) still gets its random weights: torch's
    fills are module attributes shared by every thread (found as NaN vectors from a model whose
    weights were never drawn)."""
    from torch.nn import init

    from datasette_mapclip.model.clip import weights_come_later

    def meanwhile():  # a model built here while the loader is inside weights_come_later
        return torch.nn.Linear(64, 64), init.normal_(torch.zeros(64)).abs().sum().item()

    in_loader, (layer, other) = meanwhile_in_this_thread(
        weights_come_later, lambda: init.normal_(torch.zeros(64)).abs().sum().item(), meanwhile)
    assert in_loader == 0.0  # skipped in the loading thread
    assert other > 0 and layer.weight.abs().sum().item() > 0 and torch.isfinite(layer.weight).all()
    assert not hasattr(init.normal_, "__wrapped__")  # torch's own fills are back once the last loader is done


def test_memory_mapping_checkpoints_touches_only_the_thread_that_loads_one(tmp_path):
    """While the model thread maps its checkpoint, ``torch.load`` elsewhere behaves as the caller
    asked: an old-format file (which cannot be mapped) still loads, and a zip file is read, not mapped.
    (The plugin does not use torch's own switch, ``config.load.mmap``: thread-local on torch 2.14,
    and nothing here depends on which torch that is.)"""
    from datasette_mapclip.model.clip import checkpoint_memory_mapped

    zipped, old_format = tmp_path / "zipped.pt", tmp_path / "old-format.pt"
    torch.save({"w": torch.ones(4096)}, zipped)
    torch.save({"w": torch.ones(4096)}, old_format, _use_new_zipfile_serialization=False)

    def in_loader():
        loaded = torch.load(zipped, weights_only=True)
        return str(zipped) in mapped_files() and torch.equal(loaded["w"], torch.ones(4096))

    def meanwhile():
        other = torch.load(old_format, weights_only=True)  # would raise "mmap can only be used with ..."
        return torch.equal(other["w"], torch.ones(4096)), torch.load(zipped, weights_only=True)

    mapped_in_loader, (old_loaded, read) = meanwhile_in_this_thread(checkpoint_memory_mapped, in_loader, meanwhile)
    assert mapped_in_loader and old_loaded
    gc.collect()  # the loader's tensors are gone: so is their mapping
    assert str(zipped) not in mapped_files() and torch.equal(read["w"], torch.ones(4096))  # read, never mapped
    assert not hasattr(torch.load, "__wrapped__")  # torch's own load is back once the last loader is done


def test_the_model_takes_its_weights_from_the_mapped_checkpoint_and_other_files_still_load(tiny_checkpoint,
                                                                                          tmp_path):
    """The checkpoint is mapped (page cache, not the process's own memory) and the model's weights are
    the mapped tensors, not a copy; a checkpoint in torch's old non-zip format, which cannot be mapped,
    and one whose weights are fp16 (copied into the fp32 model) load as before and encode the same."""
    private = tmp_path / "weights.pt"  # a file of this test's own: no other test's model maps it
    torch.save(torch.load(tiny_checkpoint, weights_only=True), private)
    usual = load_encoder(ModelSpec("mapclip-tiny", None, str(private)), device="cpu", precision="fp32")
    assert str(private) in mapped_files()  # the weights live in the mapping while the model does
    assert not hasattr(torch.load, "__wrapped__") and not hasattr(torch.nn.Module.load_state_dict, "__wrapped__")

    state = torch.load(tiny_checkpoint, weights_only=True)
    old_format, half = tmp_path / "old-format.pt", tmp_path / "fp16.pt"
    torch.save(state, old_format, _use_new_zipfile_serialization=False)
    torch.save({name: t.half() if t.is_floating_point() else t for name, t in state.items()}, half)
    old = load_encoder(ModelSpec("mapclip-tiny", None, str(old_format)), device="cpu", precision="fp32")
    from_half = load_encoder(ModelSpec("mapclip-tiny", None, str(half)), device="cpu", precision="fp32")
    assert all(p.dtype == torch.float32 for p in from_half.model.parameters())  # copied into the fp32 model
    texts = ["a nautical chart", "a geological map"]
    assert np.array_equal(old.encode_texts(texts), usual.encode_texts(texts))
    assert (from_half.encode_texts(texts) * usual.encode_texts(texts)).sum(axis=1).min() > 0.99
    images = [draw_map(5), draw_map(6)]
    assert np.array_equal(old.encode_images(images), usual.encode_images(images))
