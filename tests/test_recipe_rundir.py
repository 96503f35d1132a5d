"""timm_svb.recipe.rundir: the run folder's files, the run state and checkpoints saved whole."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import pytest
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
        state.record(
            {"epoch": epoch, "top1_err": top1, "top5_err": 9.0, "ema_top1_err": ema, "ema_top5_err": 9.0}
        )
    restored = recipe_rundir.RunState()
    restored.load_state_dict(state.state_dict())
    assert restored.best_ema == state.best_ema == {"epoch": 1, "top1_err": 40.0, "top5_err": 9.0}
    new = restored.record(
        {"epoch": 3, "top1_err": 44.0, "top5_err": 9.0, "ema_top1_err": 55.0, "ema_top5_err": 9.0}
    )
    assert new == ["best"] and restored.metrics()["best_ema"]["epoch"] == 1


class _SavingAccelerator:
    """What ``save_checkpoint`` uses of an Accelerator, one process: ``save_state`` writes three files."""

    is_main_process = True

    def __init__(self) -> None:
        self.tag = "old"

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str, safe_serialization: bool = True) -> None:
        Path(path).mkdir(parents=True)
        for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl"):
            (Path(path) / name).write_text(self.tag)


def test_overwriting_a_checkpoint_never_leaves_half_of_one_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill while a checkpoint folder of the same epoch is replaced leaves a whole one listed (the old or
    the new), never a partly deleted folder."""
    accelerator = _SavingAccelerator()
    recipe_rundir.save_checkpoint(accelerator, tmp_path, 2, keep=3)
    accelerator.tag = "new"
    real_rmtree, real_replace = shutil.rmtree, recipe_rundir.os.replace

    def killed_while_deleting(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name == "epoch_0002":  # deleting the listed folder in place: killed half-way
            next(Path(path).iterdir()).unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    def complete() -> dict[str, str]:
        listed = recipe_rundir.list_checkpoints(tmp_path)
        assert all(len(list(folder.iterdir())) == 3 for _, folder in listed), listed
        return {folder.name: (folder / "model.safetensors").read_text() for _, folder in listed}

    monkeypatch.setattr(recipe_rundir.shutil, "rmtree", killed_while_deleting)
    with contextlib.suppress(KeyboardInterrupt):
        recipe_rundir.save_checkpoint(accelerator, tmp_path, 2, keep=3)
    assert complete() == {"epoch_0002": "new"}
    monkeypatch.setattr(recipe_rundir.shutil, "rmtree", real_rmtree)

    def killed_between_renames(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(recipe_rundir.os, "replace", killed_between_renames)
    accelerator.tag = "newer"
    with contextlib.suppress(KeyboardInterrupt):
        recipe_rundir.save_checkpoint(accelerator, tmp_path, 2, keep=3)
    assert complete() == {}  # the old one is aside, whole ...
    monkeypatch.setattr(recipe_rundir.os, "replace", real_replace)
    recipe_rundir.save_checkpoint(accelerator, tmp_path, 3, keep=3)
    assert complete() == {"epoch_0002": "new", "epoch_0003": "newer"}  # ... and back on the next save
