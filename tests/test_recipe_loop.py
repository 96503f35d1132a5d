"""timm_svb.recipe.loop: the learning-rate schedules, the SVB schedule and the training epoch's EMA
steps."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from recipe_helpers import (
    one_thread,  # noqa: F401  (autouse fixture)
    recipe_loop,
    recipe_trainer,
)
from torch import nn

RecipeLR, lr_at_epoch = recipe_loop.RecipeLR, recipe_loop.lr_at_epoch
parse_svb_every = recipe_loop.parse_svb_every


def reference_lr(epoch: int) -> float:
    """The reference's exp regime, written out: 80 log-spaced rates 0.5 -> 0.001, each for 2 of 160 epochs."""
    return float(np.logspace(np.log10(0.5), np.log10(0.001), 80)[epoch // 2])


@pytest.mark.parametrize("epoch", [0, 1, 2, 3, 17, 40, 79, 80, 121, 158, 159])
def test_lr_schedule_matches_reference(epoch: int) -> None:
    assert lr_at_epoch(
        epoch, sched="exp", lr=0.5, min_lr=0.001, epochs=160, decay_stages=80
    ) == pytest.approx(reference_lr(epoch), rel=1e-12)


def test_scheduler_holds_each_rate_for_whole_epochs() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    scheduler = RecipeLR(optimizer, 3, sched="exp", lr=0.5, min_lr=0.001, epochs=160, decay_stages=80)
    seen = []
    for _ in range(160 * 3):  # stepped after every optimizer step, 3 steps an epoch
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([reference_lr(s // 3) for s in range(160 * 3)], rel=1e-12)
    seen = seen[::3]
    assert seen[0] == 0.5 and seen[-1] == pytest.approx(0.001)
    # ImageNet (Table 4): the same shape from 0.045
    assert lr_at_epoch(0, lr=0.045, epochs=160) == 0.045
    assert lr_at_epoch(159, lr=0.045, epochs=160) == pytest.approx(0.001)


def test_scheduler_checkpoint_holds_the_step_only() -> None:
    """A resumed run takes the schedule's settings from its command line: the state is the step count."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    old = RecipeLR(optimizer, 4, sched="exp", lr=0.5, min_lr=0.001, epochs=2, decay_stages=80)
    for _ in range(5):
        optimizer.step()
        old.step()
    new = RecipeLR(optimizer, 4, sched="exp", lr=0.5, min_lr=0.001, epochs=4, decay_stages=80)
    new.load_state_dict(old.state_dict())
    assert old.state_dict() == {"step": 5} and new.last_epoch == 5
    stage_20 = np.logspace(np.log10(0.5), np.log10(0.001), 80)[20]  # epoch 1 of 4: stage 1 * 80 // 4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(stage_20, rel=1e-12)
    new.load_state_dict({"last_epoch": 3})  # the per-epoch scheduler of earlier versions: epochs done
    assert new.last_epoch == 12


def test_cosine_schedule_starts_at_the_peak_after_warmup() -> None:
    """After warm-up the cosine anneals over the remaining epochs: the peak rate at the end of warm-up, the
    midpoint half-way through the remaining epochs, and --min-lr at --epochs."""
    schedule = {"sched": "cosine", "lr": 0.1, "min_lr": 0.001, "epochs": 25, "warmup_epochs": 5}
    assert lr_at_epoch(5, **schedule) == pytest.approx(0.1)
    assert lr_at_epoch(15, **schedule) == pytest.approx(0.0505)
    assert lr_at_epoch(25, **schedule) == pytest.approx(0.001)
    assert lr_at_epoch(2.5, **schedule) == pytest.approx(1e-4 + (0.1 - 1e-4) / 2)


def test_the_ema_counts_steps_over_the_whole_run() -> None:
    """The EMA is updated with the run's step number, not the epoch's: its decay warm-up does not restart."""
    accelerator = recipe_trainer.make_accelerator(cpu=True)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(3)]
    steps: list[int] = []
    ema = SimpleNamespace(update=lambda step: steps.append(step))
    recipe_loop.train_one_epoch(model, loader, optimizer, accelerator, epoch=2, ema=ema, progress=False)
    assert steps == [7, 8, 9]


def test_svb_every_parsing() -> None:
    assert parse_svb_every("1ep", 390) == 391  # the reference's svb_iter for CIFAR at batch 128
    assert parse_svb_every("2ep", 390) == 782
    assert parse_svb_every("391", 390) == 391
    assert parse_svb_every(50, 390) == 50
    for bad in ("0", "-3ep", "often"):
        with pytest.raises(ValueError):
            parse_svb_every(bad, 390)
