"""timm_svb.recipe.checkpoint.load_weights, the recipe's one weights loader (fine-tuning, validate.py, the
publisher): every tensor loaded exactly; a new classifier only when asked for; a refusal leaves the model as
it was and names the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

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
