"""Checkpoints and weights: where a run's checkpoints are, saving one crash-safely, resuming from one (the
options a resume may change, a rewind to an earlier one), and loading a weights file into a model (the one
loader of the recipe: fine-tuning, evaluation and publishing all use :func:`load_weights`).

A checkpoint is ``RUN/checkpoints/epoch_NNNN/``: Accelerate's state (the plain timm model's weights, the
optimizer, the scheduler, the RNG states, SVB's position, the run's progress and the EMA), written to a
temporary folder and renamed, also over an older one of the same epoch, so that a run killed while saving
leaves the previous good checkpoint and ``--resume`` picks the newest complete one. A run resumed from an
earlier checkpoint than its newest (a rewind) moves what it did after that one (later checkpoints, weights of
later epochs) to ``RUN/abandoned/after_epoch_NNNN/``: the run continues on the branch resumed.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list
from torch import nn

from .options import build_parser, run_of_weights
from .rundir import WEIGHTS, RunState, jsonable, plain_state_dict

_logger = logging.getLogger(__name__)


CHECKPOINTS = "checkpoints"


ABANDONED = "abandoned"


_CKPT_RE = re.compile(r"^epoch_(\d{4,})$")


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first: ``(epoch, folder)``."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        match = _CKPT_RE.match(p.name)
        if match and p.is_dir():
            found.append((int(match.group(1)), p))
    return sorted(found)


def find_checkpoint(resume: str, output: str | None) -> tuple[Path, Path]:
    """``--resume`` to ``(checkpoint folder, run folder)``.

    ``latest`` is the newest complete checkpoint of ``output``; otherwise ``resume`` is a checkpoint folder
    (``RUN/checkpoints/epoch_NNNN``) or a run folder (its latest checkpoint).
    """
    if resume == "latest":
        if not output:
            raise SystemExit("--resume without a checkpoint needs --output RUN_DIR (the run to continue)")
        run_dir = Path(output)
        found = list_checkpoints(run_dir)
        if not found:
            raise SystemExit(f"--resume: no checkpoint in {run_dir / CHECKPOINTS}")
        return found[-1][1], run_dir
    path = Path(resume)
    if _CKPT_RE.match(path.name) and path.is_dir():
        return path, Path(output) if output else path.parent.parent
    if path.is_dir() and list_checkpoints(path):
        return list_checkpoints(path)[-1][1], Path(output) if output else path
    raise SystemExit(
        f"--resume {resume}: not a checkpoint folder (RUN/{CHECKPOINTS}/epoch_NNNN) or a run folder"
    )


def save_checkpoint(accelerator: Any, run_dir: Path, epoch: int, keep: int) -> Path | None:
    """``accelerator.save_state`` into ``checkpoints/epoch_NNNN`` via a temporary folder and a rename.

    All processes take part (each saves its RNG state); the main process renames the finished folder and
    keeps the newest ``keep`` checkpoints. Returns the folder (None when ``keep`` is 0).
    """
    if keep <= 0:
        return None
    folder = Path(run_dir) / CHECKPOINTS
    final = folder / f"epoch_{epoch:04d}"
    tmp = folder / f".tmp-epoch_{epoch:04d}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".tmp-epoch_*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        for old in folder.glob(".old-epoch_*"):  # killed while replacing: the old one is whole, keep it
            kept = folder / old.name[len(".old-") :]
            if kept.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, kept)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        old = folder / f".old-epoch_{epoch:04d}"
        if final.exists():  # renamed aside, not deleted in place: a kill never leaves half of it listed
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        for _, previous in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(previous, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def abandon_later_epochs(run_dir: Path, epoch: int, metrics: dict[str, Any]) -> Path | None:
    """Before a run resumes from the checkpoint of ``epoch``, move what it did after that epoch (a branch the
    rewind abandons) to ``RUN/abandoned/after_epoch_NNNN[-k]/``: checkpoints of later epochs (else
    ``--resume`` would continue from them, and pruning would delete the one resumed from) and the
    ``model_*.safetensors`` whose epoch in ``metrics`` (the run's ``run.json``) is later. Returns the folder
    (None when nothing was later)."""
    later = [p for e, p in list_checkpoints(run_dir) if e > epoch]
    weights = [
        run_dir / f"model_{name}.safetensors"
        for name in WEIGHTS
        if (metrics.get(name) or {}).get("epoch", 0) > epoch
        and (run_dir / f"model_{name}.safetensors").exists()
    ]
    if not later and not weights:
        return None
    dest = base = Path(run_dir) / ABANDONED / f"after_epoch_{epoch:04d}"
    k = 1
    while dest.exists():  # rewound to this epoch before: keep that branch too
        k += 1
        dest = base.with_name(f"{base.name}-{k}")
    (dest / CHECKPOINTS).mkdir(parents=True)
    for path in later:
        os.replace(path, dest / CHECKPOINTS / path.name)
    for path in weights:
        os.replace(path, dest / path.name)
    return dest


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


# What a resumed run cannot change: its checkpoint's weights, data order and random state depend on them.
RESUME_FIXED = (
    "model",
    "model_kwargs",
    "num_classes",
    "dataset",
    "train_split",
    "train_subset",
    "batch_size",
    "seed",
    "streaming",
    # ... and the optimizer's parameter groups and what the checkpoint holds
    "filter_bias_and_bn",
    "head_lr_scale",
    "freeze_backbone",
    "model_ema",
)


# Options that do not change what is trained: not reported when they differ on resume.
RESUME_QUIET = (
    "config",
    "data_cache",
    "resume",
    "output",
    "stop_after",
    "max_steps",
    "progress",
    "log_interval",
    "log_with",
    "checkpoint_hist",
    "spectrum_every",
    "experiment",
    "run_name",
)


def run_folder(args: argparse.Namespace, state: PartialState) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume (None for a new run); the same on every process."""
    if args.resume:
        checkpoint, run_dir = find_checkpoint(args.resume, args.output)
        return run_dir, checkpoint
    if args.output:
        run_dir = Path(args.output)
    elif args.run_name:
        run_dir = Path("runs") / args.run_name
    else:
        stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
        if state.num_processes > 1:
            broadcast_object_list(stamp)
        run_dir = Path("runs") / f"{stamp[0]}-{args.model.replace('/', '_')}"
    if (run_dir / "run.json").exists():
        raise SystemExit(
            f"{run_dir} already holds a run: continue it with --resume --output {run_dir}, or choose another "
            "--output"
        )
    return run_dir, None


def resume_changes(record: dict[str, Any], args: dict[str, Any], run_dir: Path) -> dict[str, list[Any]]:
    """The options of a resumed run that differ from its record (``run.json``): ``{name: [run's, now]}``.

    One rule: the command line wins (the LR schedule, SVB's schedule, the optimizer and everything else take
    the new values from the resumed epoch on), except for :data:`RESUME_FIXED`, which are refused.
    """
    before = record.get("args")
    if before is None:  # a run of an earlier version: its recipe, less the options it holds resolved
        resolved = ("hflip", "aug", "workers", "mixed_precision", "channels_last")
        before = {k: v for k, v in record.get("recipe", {}).items() if k not in resolved}
    # a fixed option the run's version did not have yet: that run had what its default does now
    parser = build_parser()
    before = {**{k: parser.get_default(k) for k in RESUME_FIXED if k not in before}, **before}
    now = jsonable(args)
    changed = {
        k: [before[k], v] for k, v in now.items() if k in before and before[k] != v and k not in RESUME_QUIET
    }
    fixed = [k for k in RESUME_FIXED if k in changed]
    if fixed:
        raise SystemExit(
            "cannot resume with another "
            + ", ".join(
                f"--{k.replace('_', '-')} ({changed[k][0]!r} in the run, {changed[k][1]!r} now)"
                for k in fixed
            )
            + ": the checkpoint's weights, data order, random state and optimizer state depend on it. Resume "
            f"{run_dir} without changing it, or start a new run from its weights with --initial-checkpoint "
            f"{run_dir / 'model_final.safetensors'} (or model_best)"
        )
    return changed


def rewind(run_dir: Path, resume_from: Path, previous: dict[str, Any]) -> None:
    """A rewind (``--resume`` of an earlier checkpoint than the run's newest) continues on the branch resumed:
    what the run did after it is moved aside (:func:`rundir.abandon_later_epochs`), and said so."""
    epoch = int(resume_from.name.split("_")[-1])
    moved = abandon_later_epochs(run_dir, epoch, previous.get("metrics") or {})
    if moved is not None:
        _logger.warning(
            "resuming %s from epoch %d, before its newest checkpoint: what it did after epoch %d (%s) "
            "moved to %s; --resume now continues this branch",
            run_dir,
            epoch,
            epoch,
            ", ".join(sorted(p.name for p in [*moved.iterdir(), *(moved / "checkpoints").iterdir()])),
            moved,
        )


def resume(
    accelerator: Accelerator,
    checkpoint: Path,
    changed: dict[str, list[Any]],
    optimizer: torch.optim.Optimizer,
    run_state: RunState,
    epochs: int,
) -> None:
    """Load the checkpoint into everything registered; the command line's optimizer settings (weight decay,
    momentum, ...; not the scheduled rate) win over the checkpoint's, which ``load_state_dict`` restores."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    accelerator.load_state(str(checkpoint))
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update({k: v for k, v in own.items() if k != "lr"})
    _logger.info(
        "resumed after epoch %d of %d from %s%s",
        run_state.epoch,
        epochs,
        checkpoint,
        (
            "; changed on the command line, in effect from epoch "
            f"{run_state.epoch + 1} on (LR schedule, SVB schedule, optimizer, ...): "
            + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        )
        if changed
        else "",
    )


def checkpoint_plain_weights(accelerator: Accelerator, plain: nn.Module) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` use the timm model's own state dict.

    Accelerate saves the prepared model through its wrappers (``_orig_mod.`` keys under torch.compile,
    ``module.`` under DDP), so a checkpoint would only resume under the same wrappers. With these hooks (the
    pattern of Accelerate's ``register_*_state_pre_hook``) the checkpoint holds plain keys and loads into the
    plain module: a run resumes with or without ``--compile``, and under DDP or not.
    """

    def ours(model: nn.Module) -> bool:
        return accelerator.unwrap_model(model, keep_torch_compile=False) is plain

    def save_hook(models: list[nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
        for i, model in enumerate(models):
            if ours(model):
                weights[i] = plain.state_dict()

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        if [ours(m) for m in models] != [True]:
            raise RuntimeError("the recipe checkpoints exactly one model")
        models.clear()  # loaded here, not by Accelerate
        load_weights(plain, Path(input_dir) / "model.safetensors", name=type(plain).__name__)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_weights(model: nn.Module, path: str | Path, *, name: str, new_head: bool = False) -> list[str]:
    """Load a weights file into ``model`` (timm's ``name``): safetensors, or a torch file read with
    ``weights_only=True`` (a timm checkpoint's ``state_dict``), wrapper prefixes dropped. Every tensor must
    fit, except, with ``new_head`` (fine-tuning onto other classes), classifier tensors of another shape: they
    keep their initialisation, and their keys are returned. A refusal names the fix: the model that
    ``run.json`` beside the weights says they are, or the options that shape the model."""
    state = plain_state_dict(timm.models.load_state_dict(str(path), weights_only=True))
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    prefixes = (
        tuple(classifier) if isinstance(classifier, (list, tuple)) else ((classifier,) if classifier else ())
    )
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    new = [k for k in mismatched if new_head and k.startswith(prefixes)]
    wrong = [k for k in mismatched if k not in new]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:  # refused before anything is loaded: the model stays as it was
        found = f"shapes differ for {wrong[:5]}" if wrong else ""
        found += "; " if wrong and (missing or unexpected) else ""
        if missing or unexpected:
            found += f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        classes = getattr(model, "num_classes", "?")
        raise SystemExit(f"{path} does not fit {name} with {classes} classes: {found}; {_fix(path)}")
    model.load_state_dict({k: v for k, v in state.items() if k not in new}, strict=False)
    return new


def _fix(path: str | Path) -> str:
    """What to pass for weights that do not fit: what ``run.json`` beside them says they are, if there."""
    named = run_of_weights(path)
    if named is None:
        return (
            "no run.json beside them names their model: pass the --model (and --model-kwargs, --num-classes) "
            "they were trained with"
        )
    record, run = named
    kwargs = {k: v for k, v in (run.get("model_kwargs") or {}).items() if k != "num_classes"}
    return (
        f"{record} says they are {run['model']} with model kwargs {kwargs} and {run.get('num_classes')} "
        "classes: pass those (recipes/train.py --initial-checkpoint takes them from there when --model is "
        "left out)"
    )
