"""timm_svb.recipe.rundir: the run folder's files and the run state."""

from __future__ import annotations

from recipe_helpers import (
    one_thread,  # noqa: F401  (autouse fixture)
    recipe_rundir,
)


def test_plain_state_dict_drops_wrapper_prefixes() -> None:
    """Weights saved through torch.compile(DDP(model)) by earlier versions load into the timm model."""
    plain_state_dict = recipe_rundir.plain_state_dict
    assert plain_state_dict({"_orig_mod.module.a.w": 1, "_orig_mod.module.b": 2}) == {"a.w": 1, "b": 2}
    assert plain_state_dict({"module.a": 1}) == {"a": 1}
    # DDP around a compiled model: the prefixes in the other order
    assert plain_state_dict({"module._orig_mod.a.w": 1, "module._orig_mod.b": 2}) == {"a.w": 1, "b": 2}
    assert plain_state_dict({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}  # not a wrapper's prefix


def test_run_state_keeps_the_best_ema_across_a_checkpoint() -> None:
    """A resumed run's state (from a checkpoint) still knows the EMA's best epoch: a worse EMA epoch after the
    resume is not its new best (model_best_ema.safetensors is not overwritten)."""
    state = recipe_rundir.RunState()
    errors = {1: (50.0, 40.0), 2: (45.0, 60.0)}  # epoch: (model top-1, EMA top-1)
    for epoch, (top1, ema) in errors.items():
        state.add_epoch(
            {"epoch": epoch, "top1_err": top1, "top5_err": 9.0, "ema_top1_err": ema, "ema_top5_err": 9.0}
        )
    restored = recipe_rundir.RunState()
    restored.load_state_dict(state.state_dict())
    assert restored.best_ema == state.best_ema == {"epoch": 1, "top1_err": 40.0, "top5_err": 9.0}
    new = restored.add_epoch(
        {"epoch": 3, "top1_err": 44.0, "top5_err": 9.0, "ema_top1_err": 55.0, "ema_top5_err": 9.0}
    )
    assert new == ["best"] and restored.metrics()["best_ema"]["epoch"] == 1
