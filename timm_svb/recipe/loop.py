"""The training loop: learning-rate schedules, parameter groups, the SVB plugin's schedule, the model EMA
(bounded by SVB with the model), freezing a backbone, one training epoch, evaluation.

:func:`evaluate` is public: ``recipes/validate.py`` (and through it ``hub/publish.py``) evaluates with it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from timm_svb import SVB, SVBStats

__all__ = [
    "BoundedEMA",
    "RecordingSVB",
    "RecipeLR",
    "TrainStats",
    "evaluate",
    "freeze_backbone",
    "frozen_layer_names",
    "lr_at_epoch",
    "param_groups",
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

    Warm-up therefore rises every step; the schedule after it changes at epoch boundaries. Every parameter
    group gets the rate times its ``lr_scale`` (1 when absent; timm's convention, see :func:`param_groups`).
    ``state_dict`` holds the step count only: a resumed run takes the schedule's settings (``--epochs``,
    ``--lr``, ...) from its command line, as the rest of the recipe does.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, **schedule: Any) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.steps_per_epoch = steps_per_epoch
        self.schedule = schedule
        lr_at_epoch(0, **schedule)  # validate
        super().__init__(optimizer)

    @property
    def base_lr(self) -> float:
        """The schedule's rate now (a group's rate is this times its ``lr_scale``)."""
        return lr_at_epoch(max(self.last_epoch, 0) / self.steps_per_epoch, **self.schedule)

    def get_lr(self) -> list[float]:
        lr = self.base_lr
        return [lr * group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]

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


def param_groups(
    model: nn.Module, weight_decay: float, *, filter_bias_and_bn: bool = False, head_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups of ``model``'s trainable parameters.

    ``filter_bias_and_bn``: no weight decay on 1-D parameters (BN scales and shifts, biases), timm's
    ``param_groups_weight_decay``; otherwise one group decays everything (the paper's recipe). A
    ``head_lr_scale`` other than 1 puts the classifier's parameters (``model.get_classifier()``) in groups of
    their own with ``lr_scale`` (:class:`RecipeLR` multiplies the rate by it). Frozen parameters are left out.
    """
    groups = param_groups_weight_decay(model, weight_decay, weight_decay_exclude_1d=filter_bias_and_bn)
    if head_lr_scale != 1.0:
        head = {id(p) for p in model.get_classifier().parameters()}
        split = []
        for group in groups:
            body = [p for p in group["params"] if id(p) not in head]
            top = [p for p in group["params"] if id(p) in head]
            split += [{**group, "params": body}, {**group, "params": top, "lr_scale": head_lr_scale}]
        groups = split
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameter")
    return groups


def freeze_backbone(model: nn.Module) -> list[nn.Module]:
    """Freeze every parameter of ``model`` but the classifier's (``model.get_classifier()``): linear probing.

    Returns the backbone's BatchNorm layers, which :func:`train_one_epoch` keeps in eval mode: their running
    statistics are part of the frozen features (as in MoCo's linear classification protocol).
    """
    head = model.get_classifier()
    head_params = {id(p) for p in head.parameters()}
    if not head_params:
        raise ValueError(f"{type(model).__name__} has no classifier parameters to train (num_classes=0?)")
    for p in model.parameters():
        p.requires_grad_(id(p) in head_params)
    in_head = {id(m) for m in head.modules()}
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and id(m) not in in_head]


def frozen_layer_names(model: nn.Module) -> list[str]:
    """Glob patterns (``fnmatch``-escaped names) of the modules whose ``weight`` is a frozen parameter: the
    layers SVB must leave alone (bounding would change weights that training does not)."""
    return [
        re.sub(r"([*?[])", r"[\1]", name)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), nn.Parameter) and not module.weight.requires_grad
    ]


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

    def __init__(self, *args: argparse.Namespace, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_stats: SVBStats | None = None
        self.seconds = 0.0

    def apply(self, per_layer: bool = False) -> SVBStats:
        start = time.perf_counter()
        stats = super().apply(per_layer)
        self.seconds += time.perf_counter() - start
        self.last_stats = stats
        return stats


class BoundedEMA:
    """timm's ``ModelEmaV3`` of a model, bounded by SVB whenever the model's SVB bounds.

    An average of bounded matrices is not bounded: the singular values of ``(1 - d) W_t + d W_ema`` can leave
    the band ``[1/(1+eps), 1+eps]`` that each term lies in. So after an EMA update that follows a bounding of
    the model (``model_svb.num_applied`` moved), ``svb`` (an :class:`SVB` of the EMA copy, with the model
    SVB's settings and layer selection) bounds the copy too. Under DDP :meth:`update` runs on every process,
    and with it the collective ``svb.apply()``. ``state_dict`` is checkpointed with the run.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        *,
        warmup: bool = False,
        model_svb: SVB | None = None,
        svb: Callable[[nn.Module], RecordingSVB] | None = None,
    ) -> None:
        self.model = model
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=warmup)
        self.model_svb = model_svb
        self.svb = svb(self.ema.module) if model_svb is not None and svb is not None else None
        self.seen = model_svb.num_applied if model_svb is not None else 0  # the model's boundings seen
        self.num_applied = 0  # boundings of the EMA copy

    @property
    def module(self) -> nn.Module:
        """The averaged model (eval mode)."""
        return self.ema.module

    def update(self, step: int) -> None:
        """Average the model in after optimizer step ``step`` (1-based); bound if the model was bounded."""
        self.ema.update(self.model, step=step)
        if self.svb is not None and self.model_svb.num_applied != self.seen:
            self.seen = self.model_svb.num_applied
            self.svb.apply()
            self.num_applied += 1

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict(), "seen": self.seen, "num_applied": self.num_applied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])
        self.seen, self.num_applied = int(state["seen"]), int(state["num_applied"])


# ------------------------------------------------------------------------------------------- training


@dataclass
class TrainStats:
    """What one training epoch did."""

    loss: float
    steps: int
    images: int
    seconds: float
    images_per_s: float
    top1_err: float | None = None  # on the augmented training batches; None with mixed (soft) targets
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
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    smoothing: float = 0.0,
    mixup_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ema: BoundedEMA | None = None,
    eval_modules: Sequence[nn.Module] = (),
    clip_grad: float | None = None,
    channels_last: bool = False,
    progress: bool = True,
    log_interval: int = 50,
    max_steps: int | None = None,
) -> TrainStats:
    """One epoch of SGD with Accelerate; the SVB plugin (if attached to ``optimizer``) runs in its step hook.
    ``max_steps`` cuts the epoch after that many optimizer steps.

    Every loader batch is one optimizer step, after which ``ema`` (if given) averages the model in and
    ``scheduler`` (if given) is stepped: with ``grad_accum_steps = k`` the batch is cut into ``k``
    micro-batches whose gradients are accumulated (``accelerator.accumulate``, which skips DDP's gradient
    all-reduce until the last one; the accelerator must be built with
    ``GradientAccumulationPlugin(num_steps=k, sync_with_dataloader=False)``), so the step equals the
    un-accumulated one. ``mixup_fn`` (timm's ``Mixup``) mixes each whole batch first, making the targets soft
    (``loss_fn`` must take them: ``SoftTargetCrossEntropy``); the default loss is cross-entropy with
    ``smoothing``. ``eval_modules`` stay in eval mode (a frozen backbone's BN layers). The loss is
    synchronised only every ``log_interval`` steps (progress bar) and at the end; the training top-1 error is
    counted on hard targets only. Batches of a loader not prepared by ``accelerator`` (a streamed split) are
    moved to its device here.
    """
    model.train()
    for module in eval_modules:
        module.eval()
    loss_fn = loss_fn or functools.partial(F.cross_entropy, label_smoothing=smoothing)
    device = accelerator.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    hits = torch.zeros((), device=device, dtype=torch.int64)
    chunks_done = 0
    steps = images = 0
    hard_targets = mixup_fn is None
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
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
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
                loss = loss_fn(logits.float(), yc)
                accelerator.backward(loss)
                if clip_grad and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            if hard_targets:
                hits += (logits.detach().argmax(dim=1) == yc).sum()
            chunks_done += 1
        steps += 1
        if ema is not None:
            ema.update(step=epoch * (total or 0) + steps)
        if scheduler is not None:
            scheduler.step()
        images += x.shape[0]
        if not bar.disable:
            bar.update(1)
            if steps % log_interval == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / chunks_done:.4f}", refresh=False)
        if steps == max_steps:
            break
    seconds = time.perf_counter() - start
    bar.close()
    mean_loss = accelerator.reduce(loss_sum / max(chunks_done, 1), reduction="mean")
    top1_err = None
    if hard_targets:
        correct = int(accelerator.reduce(hits, reduction="sum"))
        top1_err = 100.0 * (1 - correct / max(images * accelerator.num_processes, 1))
    images *= accelerator.num_processes
    return TrainStats(
        loss=float(mean_loss),
        steps=steps,
        images=images,
        seconds=seconds,
        images_per_s=images / seconds if seconds > 0 else float("nan"),
        top1_err=top1_err,
    )


# ----------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    accelerator: Any = None,
    *,
    channels_last: bool = False,
    mixed_precision: str | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 error (percent, as the paper reports them) and mean cross-entropy on ``loader``.

    Without ``accelerator`` the batches are moved to the model's device; with one, ``loader`` must be prepared
    by it and the predictions of all processes are gathered (``gather_for_metrics`` drops the padding of the
    last batch), so every process returns the metrics of the whole split; the forward pass runs in its
    autocast (a model it did not prepare, such as the EMA copy, gets the same precision as the prepared
    one); without, in torch's autocast of ``mixed_precision`` (``bf16``, ``fp16``; None or ``no``: none).
    Top-5 is top-``min(5, classes)``.
    Returns ``{"top1_err", "top5_err", "loss", "num_images"}``; the model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    if accelerator is not None:
        autocast = accelerator.autocast
    elif mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        autocast = functools.partial(torch.autocast, device.type, dtype=dtype)
    else:
        autocast = contextlib.nullcontext
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for x, y in loader:
        if accelerator is None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
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
