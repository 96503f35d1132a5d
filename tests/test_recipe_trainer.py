"""timm_svb.recipe.trainer's stages, without a run: the EMA's SVB and mixup."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
import torch
from recipe_helpers import (
    one_thread,  # noqa: F401  (autouse fixture)
    recipe_loop,
    recipe_trainer,
)

import timm_svb  # noqa: F401  (registers the zoo)


def test_the_emas_svb_leaves_excluded_and_frozen_layers_alone() -> None:
    """The EMA copy is bounded on the model SVB's layer selection: without --svb-exclude's layers and the
    frozen ones (bounding them would change weights that training does not)."""
    model = timm.create_model("convnet20_svb", num_classes=4)
    for p in model.stem.parameters():
        p.requires_grad_(False)
    args = SimpleNamespace(model_ema_decay=0.9, model_ema_warmup=False, svb_exclude=["fc"])
    svb = recipe_loop.RecordingSVB(model, 0.5, 1.0, exclude=recipe_trainer._svb_exclude(args, model))
    ema = recipe_trainer._make_ema(args, model, svb)
    names = [layer.name for layer in ema.svb.layers]
    assert names == [layer.name for layer in svb.layers]
    assert "fc" not in names and not any(n.startswith("stem") for n in names)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixup_mode_is_used(mode: str) -> None:
    args = SimpleNamespace(
        mixup=0.8,
        cutmix=1.0,
        mixup_prob=1.0,
        mixup_switch_prob=0.5,
        mixup_mode=mode,
        smoothing=0.1,
        batch_size=8,
    )
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    mixup_fn, _ = recipe_trainer._mixup_and_loss(args, accelerator, 4)
    assert mixup_fn.mode == mode
