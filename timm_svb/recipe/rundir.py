"""The run folder: ``run.json``, weights as safetensors, ``summary.csv`` (checkpoints: :mod:`.checkpoint`).

Layout (``hub/publish.py`` reads ``run.json`` and ``model_{best,final}.safetensors``)::

    RUN/run.json                  model, model_kwargs, num_classes, svb_config, dataset, recipe, metrics, ...
    RUN/model_best.safetensors    lowest top-1 test error so far
    RUN/model_final.safetensors   after the last epoch
    RUN/model_{best,final}_ema.safetensors   the same of the model EMA (--model-ema)
    RUN/summary.csv               one row per epoch
    RUN/curves.png                train loss and test error per epoch, SVB applications marked
    RUN/args.yaml                 the resolved configuration (a valid --config)
    RUN/checkpoints/epoch_NNNN/   accelerate states (model, optimizer, scheduler, RNG, SVB, run state)

Every file is written to a temporary name and renamed (weights with the mode of any other new file): a run
killed while saving leaves the previous good files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

__all__ = [
    "RunState",
    "SUMMARY_FIELDS",
    "WEIGHTS",
    "atomic_write_text",
    "jsonable",
    "metrics_of",
    "new_file_mode",
    "plain_state_dict",
    "save_weights",
    "write_summary",
]

SUMMARY_FIELDS = (
    "epoch",
    "lr",
    "train_loss",
    "train_top1_err",
    "test_loss",
    "top1_err",
    "top5_err",
    "images_per_s",
    "epoch_s",
    "svb_applied",
    "svb_applied_total",
    "svb_clipped",
    "svb_sv_min",
    "svb_sv_max",
    "bbn_clipped",
    "svb_s",
    "ema_test_loss",
    "ema_top1_err",
    "ema_top5_err",
    "ema_svb_clipped",
    "ema_svb_sv_min",
    "ema_svb_sv_max",
)
# The weights a run saves (model_NAME.safetensors) and the summary.csv prefix of their test errors.
WEIGHTS = {"best": "", "final": "", "best_ema": "ema_", "final_ema": "ema_"}


class RunState:
    """Progress of the run saved in every checkpoint: completed epochs, per-epoch metrics, best epochs (of the
    model and, with ``--model-ema``, of its EMA)."""

    def __init__(self) -> None:
        self.epoch = 0  # completed epochs
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_ema: dict[str, Any] | None = None

    def add_epoch(self, row: dict[str, Any]) -> list[str]:
        """Add an epoch's row; returns the weights it is the new best of (lowest top-1, then top-5 error):
        ``best`` (the model's errors), ``best_ema`` (the EMA's, ``ema_top1_err``/``ema_top5_err``)."""
        self.history.append(row)
        self.epoch = row["epoch"]
        new = []
        for name in ("best", "best_ema"):
            key = metrics_of(row, name)
            if key is None:
                continue
            best = getattr(self, name)
            if best is None or (key["top1_err"], key["top5_err"]) < (best["top1_err"], best["top5_err"]):
                setattr(self, name, key)
                new.append(name)
        return new

    def metrics(self) -> dict[str, dict[str, Any] | None]:
        """``run.json``'s ``metrics``: epoch, top-1 and top-5 test error of each kind of saved weights (the
        EMA's only when there is one)."""
        final = self.history[-1] if self.history else None
        metrics = {"best": self.best, "final": metrics_of(final, "final") if final else None}
        if self.best_ema is not None:
            metrics.update(best_ema=self.best_ema, final_ema=metrics_of(final, "final_ema"))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "history": self.history, "best": self.best, "best_ema": self.best_ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best = state["best"]
        self.best_ema = state.get("best_ema")  # checkpoints of earlier versions have none


def metrics_of(row: dict[str, Any], weights: str) -> dict[str, Any] | None:
    """``{"epoch", "top1_err", "top5_err"}`` of ``weights`` (a key of :data:`WEIGHTS`) in a summary row; None
    when the row has none (no EMA)."""
    prefix = WEIGHTS[weights]
    if row.get(f"{prefix}top1_err") is None:
        return None
    return {"epoch": row["epoch"], "top1_err": row[f"{prefix}top1_err"], "top5_err": row[f"{prefix}top5_err"]}


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_weights(model: nn.Module, path: Path) -> None:
    """The model's state dict as safetensors (CPU, contiguous, metadata ``{"format": "pt"}``), atomically,
    with the mode of any other new file (safetensors writes 0600)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, new_file_mode())
    os.replace(tmp, path)


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def plain_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the prefixes that wrappers put in front of every key: ``_orig_mod.``
    (torch.compile) and ``module.`` (DDP), in any nesting, so that checkpoints of earlier versions, saved
    through the wrappers, load."""
    while state:
        prefix = next((p for p in ("_orig_mod.", "module.") if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def write_summary(path: Path, history: list[dict[str, Any]]) -> None:
    """``summary.csv`` from the per-epoch rows (rewritten whole: a resumed run drops rows it repeats)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _csv_value(row.get(k)) for k in SUMMARY_FIELDS})
    atomic_write_text(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def write_run_json(path: Path, run: dict[str, Any]) -> None:
    """``run.json``, atomically."""
    atomic_write_text(path, json.dumps(jsonable(run), indent=2) + "\n")


def jsonable(value: Any) -> Any:
    """``value`` as JSON holds it: string keys, lists for tuples, None for NaN/Inf, str for other types."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
