"""Shared helpers of the recipe tests (tests/test_recipe*.py): run recipes/train.py in this process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"

from timm_svb.recipe import checkpoint as recipe_checkpoint  # noqa: E402
from timm_svb.recipe import data as recipe_data  # noqa: E402
from timm_svb.recipe import loop as recipe_loop  # noqa: E402
from timm_svb.recipe import memory_data as recipe_memory_data  # noqa: E402
from timm_svb.recipe import options as recipe_options  # noqa: E402
from timm_svb.recipe import reporting as recipe_reporting  # noqa: E402
from timm_svb.recipe import rundir as recipe_rundir  # noqa: E402
from timm_svb.recipe import trainer as recipe_trainer  # noqa: E402
from timm_svb.recipe import validate as recipe_validate  # noqa: E402

__all__ = [
    "FAST",
    "RECIPES",
    "REPO",
    "make_data",
    "one_thread",
    "optimizer_groups",
    "recipe_checkpoint",
    "recipe_data",
    "recipe_loop",
    "recipe_memory_data",
    "recipe_options",
    "recipe_reporting",
    "recipe_rundir",
    "recipe_trainer",
    "recipe_validate",
    "run_recipe",
]

# small, fast and deterministic: no workers, no progress bars, no trackers
FAST = ["--workers", "0", "--no-progress", "--log-with", "none"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread in each module that imports this fixture (more threads spin on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_recipe(argv: list[str]) -> Any:
    """``recipes/train.py ARGV`` in this process (fast settings); returns its ``TrainResult``."""
    return recipe_trainer.run_in_process([*argv, *FAST])


def make_data(path: Path, **kwargs: Any) -> Path:
    """A generated image-classification data set saved to ``path`` (see ``data.make_synthetic_dataset``)."""
    recipe_data.make_synthetic_dataset(path, **kwargs)
    return path


@contextlib.contextmanager
def optimizer_groups() -> Iterator[list[list[dict]]]:
    """The parameter groups (settings and parameter shapes) of every optimizer step taken inside the block."""
    seen: list[list[dict]] = []

    def hook(opt, args, kwargs):  # noqa: ANN001, ANN202
        seen.append(
            [
                {
                    **{k: v for k, v in g.items() if k != "params"},
                    "shapes": [tuple(p.shape) for p in g["params"]],
                }
                for g in opt.param_groups
            ]
        )

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
