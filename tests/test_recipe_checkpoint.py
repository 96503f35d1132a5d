"""timm_svb.recipe.checkpoint: checkpoints saved whole (a kill never leaves half of one listed), and
load_weights, the recipe's one weights loader (fine-tuning, validate.py, the publisher): every tensor loaded
exactly; a new classifier only when asked for; a refusal leaves the model as it was and names the fix."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import timm
import torch
from recipe_helpers import recipe_checkpoint

import timm_svb  # noqa: F401  (registers the zoo)
from timm_svb.recipe.checkpoint import load_weights

TINY = {"depth_x": 1}


def _save(model: torch.nn.Module, path: Path) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_every_tensor_is_loaded_and_a_new_head_only_when_asked(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("convnet20", num_classes=10, **TINY)
    weights = _save(source, tmp_path / "w.safetensors")
    same = timm.create_model("convnet20", num_classes=10, **TINY)
    assert load_weights(same, weights, name="convnet20") == []
    assert _same(same.state_dict(), source.state_dict(), list(source.state_dict()))

    other = timm.create_model("convnet20", num_classes=6, **TINY)
    head = {k: v.clone() for k, v in other.state_dict().items() if k.startswith("fc.")}
    assert sorted(load_weights(other, weights, name="convnet20", new_head=True)) == ["fc.bias", "fc.weight"]
    body = [k for k in source.state_dict() if not k.startswith("fc.")]
    assert _same(other.state_dict(), source.state_dict(), body)
    assert _same(other.state_dict(), head, list(head))  # the new classifier keeps its initialisation


def test_a_refusal_leaves_the_model_alone_and_names_the_fix(tmp_path: Path) -> None:
    source = timm.create_model("convnet20", num_classes=10, **TINY)
    weights = _save(source, tmp_path / "w.safetensors")
    target = timm.create_model("convnet20", num_classes=6, **TINY)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(SystemExit, match=r"does not fit convnet20 with 6 classes: shapes differ for .*fc"):
        load_weights(target, weights, name="convnet20")  # strict: no new head unless asked
    assert _same(target.state_dict(), before, list(before))
    deeper = timm.create_model("convnet20", num_classes=10)
    with pytest.raises(SystemExit, match="no run.json beside them names their model: pass the --model"):
        load_weights(deeper, weights, name="convnet20", new_head=True)
    (tmp_path / "run.json").write_text(
        json.dumps({"model": "convnet20", "model_kwargs": {**TINY, "num_classes": 10}, "num_classes": 10})
    )
    with pytest.raises(
        SystemExit, match=r"run.json says they are convnet20 with model kwargs \{'depth_x': 1\}"
    ):
        load_weights(deeper, weights, name="convnet20", new_head=True)


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
    recipe_checkpoint.save_checkpoint(accelerator, tmp_path, 2, keep=3)
    accelerator.tag = "new"
    real_rmtree, real_replace = shutil.rmtree, recipe_checkpoint.os.replace

    def killed_while_deleting(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name == "epoch_0002":  # deleting the listed folder in place: killed half-way
            next(Path(path).iterdir()).unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    def complete() -> dict[str, str]:
        listed = recipe_checkpoint.list_checkpoints(tmp_path)
        assert all(len(list(folder.iterdir())) == 3 for _, folder in listed), listed
        return {folder.name: (folder / "model.safetensors").read_text() for _, folder in listed}

    monkeypatch.setattr(recipe_checkpoint.shutil, "rmtree", killed_while_deleting)
    with contextlib.suppress(KeyboardInterrupt):
        recipe_checkpoint.save_checkpoint(accelerator, tmp_path, 2, keep=3)
    assert complete() == {"epoch_0002": "new"}
    monkeypatch.setattr(recipe_checkpoint.shutil, "rmtree", real_rmtree)

    def killed_between_renames(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(recipe_checkpoint.os, "replace", killed_between_renames)
    accelerator.tag = "newer"
    with contextlib.suppress(KeyboardInterrupt):
        recipe_checkpoint.save_checkpoint(accelerator, tmp_path, 2, keep=3)
    assert complete() == {}  # the old one is aside, whole ...
    monkeypatch.setattr(recipe_checkpoint.os, "replace", real_replace)
    recipe_checkpoint.save_checkpoint(accelerator, tmp_path, 3, keep=3)
    assert complete() == {"epoch_0002": "new", "epoch_0003": "newer"}  # ... and back on the next save
