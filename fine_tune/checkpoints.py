"""What a training run leaves in its output folder, written so a kill never leaves half a file.

    epoch_N.pt      everything needed to continue after epoch N: model, optimizer, scheduler,
                    RNG states, best validation loss, the log so far, the arguments
    best.pt         the plain ``state_dict`` of the best epoch (lowest validation loss):
                    ``open_clip.create_model_and_transforms(arch, pretrained="best.pt")`` and
                    every mapclip command's ``--model ARCH --checkpoint best.pt`` load it
    training.json   architecture, starting weights and arguments, for evaluate and register
    train_log.csv   one row per epoch

Why atomic writes: training is resumed by rerunning the same command, and a process killed
mid-``torch.save`` must not leave a truncated ``epoch_N.pt`` that the rerun would trust.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
BEST = "best.pt"
TRAINING_JSON = "training.json"
LOG = "train_log.csv"
LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "logit_scale", "seconds", "best")


def atomic_torch_save(obj, path: Path):
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def epoch_path(out_dir: Path, epoch: int) -> Path:
    return Path(out_dir) / f"epoch_{epoch}.pt"


def epoch_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every epoch checkpoint in ``out_dir``, oldest first."""
    found = []
    for path in Path(out_dir).glob("epoch_*.pt"):
        match = EPOCH_FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def load_latest(out_dir: Path) -> dict | None:
    """The newest readable epoch checkpoint, or None when there is none to resume from."""
    import torch

    for epoch, path in reversed(epoch_checkpoints(out_dir)):
        try:
            # Our own files: they hold numpy RNG state, which weights_only refuses.
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # unreadable: fall back to the one before
            continue
    return None


def prune(out_dir: Path, keep: int):
    """Delete all but the newest ``keep`` epoch checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for _, path in epoch_checkpoints(out_dir)[:-keep]:
        path.unlink(missing_ok=True)


def write_log(out_dir: Path, history: list[dict]):
    """Rewrite the whole log from the checkpoint's history, so a resumed run never repeats rows."""
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    for row in history:
        writer.writerow({column: row.get(column) for column in LOG_COLUMNS})
    atomic_write_text(Path(out_dir) / LOG, buffer.getvalue())


def write_training_json(out_dir: Path, info: dict):
    atomic_write_text(Path(out_dir) / TRAINING_JSON, json.dumps(info, indent=2, default=str) + "\n")


def read_training_json(folder: Path) -> dict:
    path = Path(folder) / TRAINING_JSON
    return json.loads(path.read_text()) if path.is_file() else {}
