"""The training engine: learning-rate schedules, the SVB plugin's schedule, one training epoch, evaluation.

:func:`evaluate` is public: ``hub/publish.py`` re-evaluates published weights with it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from timm_svb import SVB, SVBStats

__all__ = [
    "RecordingSVB",
    "RecipeLR",
    "TrainStats",
    "evaluate",
    "lr_at_epoch",
    "parse_svb_every",
    "svb_apply_steps",
    "train_one_epoch",
]


# ------------------------------------------------------------------------------------------- LR schedule


def lr_at_epoch(
    epoch: float,
    *,
    sched: str = "exp",
    lr: float = 0.5,
    min_lr: float = 0.001,
    epochs: int = 160,
    decay_stages: int = 80,
    warmup_epochs: int = 0,
    warmup_lr: float = 1e-4,
) -> float:
    """Learning rate at ``epoch`` (0-based; a fraction is a point inside an epoch).

    ``warmup_epochs`` ramp linearly from ``warmup_lr`` at 0 towards ``lr`` at ``warmup_epochs``,
    continuously (per step, with ``epoch = step / steps_per_epoch``). After warm-up the schedule is held
    for whole epochs: ``exp`` is the reference's stepped exponential decay, ``decay_stages`` log-spaced values
    from ``lr`` down to ``min_lr`` (both included), stage ``floor(e * decay_stages / epochs)`` in epoch ``e``
    (160 epochs and 80 stages: each value held for 2 epochs); ``cosine`` anneals from ``lr`` to ``min_lr``
    over the epochs after warm-up; ``const`` keeps ``lr``.
    """
    if epoch < warmup_epochs:
        return warmup_lr + (lr - warmup_lr) * epoch / warmup_epochs
    e = math.floor(epoch)
    if sched == "const":
        return lr
    if sched == "exp":
        if lr <= 0 or min_lr <= 0:
            raise ValueError(f"the exp schedule needs --lr and --min-lr > 0, got {lr} and {min_lr}")
        stage = min(e * decay_stages // epochs, decay_stages - 1)
        if decay_stages == 1:
            return lr
        return lr * (min_lr / lr) ** (stage / (decay_stages - 1))
    if sched == "cosine":
        span = max(epochs - warmup_epochs, 1)
        t = min(e - warmup_epochs, span) / span
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {sched!r} (exp, cosine, const)")


class RecipeLR(LRScheduler):
    """:func:`lr_at_epoch` at ``step / steps_per_epoch``, stepped after every optimizer step.

    Warm-up therefore rises every step; the schedule after it changes at epoch boundaries. All parameter
    groups get the same rate. ``state_dict`` holds the step count only: a resumed run takes the schedule's
    settings (``--epochs``, ``--lr``, ...) from its command line, as the rest of the recipe does.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, **schedule: Any) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.steps_per_epoch = steps_per_epoch
        self.schedule = schedule
        lr_at_epoch(0, **schedule)  # validate
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        lr = lr_at_epoch(max(self.last_epoch, 0) / self.steps_per_epoch, **self.schedule)
        return [lr for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, int]:
        return {"step": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "step" in state_dict:
            self.last_epoch = int(state_dict["step"])
        else:  # a checkpoint of the per-epoch scheduler of earlier versions: epochs done
            self.last_epoch = int(state_dict["last_epoch"]) * self.steps_per_epoch
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr


# ---------------------------------------------------------------------------------------- SVB schedule


def parse_svb_every(value: str | int, steps_per_epoch: int) -> int:
    """``--svb-every`` to optimizer steps: an integer is steps, ``Nep`` is N epochs.

    One epoch counts ``steps_per_epoch + 1`` steps, the reference's ``svb_iter`` (391 for the 390 full batches
    of CIFAR at batch 128): the moment of bounding moves one step later in each epoch, so that together with
    ``skip_last_steps`` it falls early in the epoch and the BN statistics are re-estimated before testing.
    """
    text = str(value).strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*(?:ep|epoch|epochs)", text)
    if match:
        number = float(match.group(1))
        if number <= 0:
            raise ValueError(f"--svb-every must be > 0, got {value!r}")
        return max(1, round(number * (steps_per_epoch + 1)))
    try:
        steps = int(text)
    except ValueError:
        raise ValueError(f"--svb-every takes steps (391) or epochs (1ep), got {value!r}") from None
    if steps < 1:
        raise ValueError(f"--svb-every must be >= 1, got {value!r}")
    return steps


def svb_apply_steps(svb: SVB, total_steps: int) -> list[int]:
    """The real optimizer steps (1-based) after which ``svb`` bounds, in a run of ``total_steps`` steps."""
    if svb.every_n_steps is None:
        return []
    return [s for s in range(svb.every_n_steps, total_steps + 1, svb.every_n_steps) if svb.should_apply(s)]


class RecordingSVB(SVB):
    """:class:`timm_svb.SVB` that remembers the statistics and the time of its last :meth:`apply`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_stats: SVBStats | None = None
        self.seconds = 0.0

    def apply(self, per_layer: bool = False) -> SVBStats:
        start = time.perf_counter()
        stats = super().apply(per_layer)
        self.seconds += time.perf_counter() - start
        self.last_stats = stats
        return stats


# ------------------------------------------------------------------------------------------- training


@dataclass
class TrainStats:
    """What one training epoch did."""

    loss: float
    steps: int
    images: int
    seconds: float
    images_per_s: float
    extra: dict[str, float] = field(default_factory=dict)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    accelerator: Any,
    *,
    scheduler: Any = None,
    epoch: int = 0,
    grad_accum_steps: int = 1,
    smoothing: float = 0.0,
    clip_grad: float | None = None,
    channels_last: bool = False,
    progress: bool = True,
    log_interval: int = 50,
) -> TrainStats:
    """One epoch of SGD with Accelerate; the SVB plugin (if attached to ``optimizer``) runs in its step hook.

    Every loader batch is one optimizer step, after which ``scheduler`` (if given) is stepped: with
    ``grad_accum_steps = k`` it is cut into ``k`` micro-batches whose gradients are accumulated
    (``accelerator.accumulate``, which skips DDP's gradient all-reduce until the last one; the accelerator
    must be built with ``GradientAccumulationPlugin(num_steps=k, sync_with_dataloader=False)``), so the step
    equals the un-accumulated one. The loss is synchronised only every ``log_interval`` steps (progress bar)
    and at the end. Batches of a loader not prepared by ``accelerator`` (a streamed split) are moved to its
    device here.
    """
    model.train()
    device = accelerator.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    chunks_done = 0
    steps = images = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(
        total=total,
        desc=f"epoch {epoch + 1}",
        disable=not (progress and accelerator.is_main_process),
        leave=False,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    for x, y in loader:
        if x.device != device:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pairs = (
            zip(x.chunk(grad_accum_steps), y.chunk(grad_accum_steps), strict=True)
            if grad_accum_steps > 1
            else ((x, y),)
        )
        for xc, yc in pairs:
            with accelerator.accumulate(model):
                logits = model(xc)
                loss = F.cross_entropy(logits.float(), yc, label_smoothing=smoothing)
                accelerator.backward(loss)
                if clip_grad and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            chunks_done += 1
        if scheduler is not None:
            scheduler.step()
        steps += 1
        images += x.shape[0]
        if not bar.disable:
            bar.update(1)
            if steps % log_interval == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / chunks_done:.4f}", refresh=False)
    seconds = time.perf_counter() - start
    bar.close()
    mean_loss = accelerator.reduce(loss_sum / max(chunks_done, 1), reduction="mean")
    images *= accelerator.num_processes
    return TrainStats(
        loss=float(mean_loss),
        steps=steps,
        images=images,
        seconds=seconds,
        images_per_s=images / seconds if seconds > 0 else float("nan"),
    )


# ----------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    accelerator: Any = None,
    *,
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 error (percent, as the paper reports them) and mean cross-entropy on ``loader``.

    Without ``accelerator`` the batches are moved to the model's device; with one, ``loader`` must be prepared
    by it and the predictions of all processes are gathered (``gather_for_metrics`` drops the padding of the
    last batch), so every process returns the metrics of the whole split. Top-5 is top-``min(5, classes)``.
    Returns ``{"top1_err", "top5_err", "loss", "num_images"}``; the model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for x, y in loader:
        if accelerator is None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        losses = F.cross_entropy(logits, y, reduction="none")
        if accelerator is not None:
            top, y, losses = accelerator.gather_for_metrics((top, y, losses))
        hits = top == y[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += int(y.numel())
        loss_sum += float(losses.sum())
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluate(): the loader yielded no images")
    return {
        "top1_err": 100.0 * (total - correct1) / total,
        "top5_err": 100.0 * (total - correct5) / total,
        "loss": loss_sum / total,
        "num_images": total,
    }
