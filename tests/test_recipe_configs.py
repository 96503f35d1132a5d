"""Every paper recipe in recipes/configs/ runs: one training step, SVB + BBN bounding right after it (checked
against numpy float64 SVD and Algorithm 2 written out), and a test pass on generated data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from recipe_helpers import (
    make_data,
    one_thread,  # noqa: F401  (autouse fixture)
    recipe_data,
    recipe_loop,
    recipe_options,
    run_recipe,
)
from torch import nn

import timm_svb
import timm_svb.models._helpers

# every config trains a few steps
pytestmark = pytest.mark.slow

CONFIGS = sorted(recipe_options.CONFIG_DIR.glob("*.yaml"))
# The configs' settings are under test, not the widths of WRN-28-10/16 (36.5M / 94.2M parameters, minutes
# per step on two CPU cores; their widths are tested in test_models.py): they run at width 1, depth 28; and
# Inception-ResNet-v2 on 107x107 inputs, not 299x299 (4x fewer pixels; 299 inputs: test_recipe_runs.py).
SMALLER = {
    "wrn28_": ["--model-kwargs", "width_factor=1"],
    "inception_resnet": ["--input-size", "3", "107", "107"],
}
# Layers checked against numpy: all, or 16 evenly spread (Inception-ResNet-v2 has 244, up to 2080 channels)
MAX_LAYERS_CHECKED = 16
# The bounded float32 matrix against the float64 reference: relative (Frobenius) distance, and how far its
# singular values may lie past the band. Measured here at most 1.7e-5 and 3.2e-5 (ConvNet-38's 16 x 144
# He-init convs, every value far out of band, eps 0.05), above the engine's documented ~1e-5 and 2e-5 slack.
REBUILD_TOL = EDGE_TOL = 5e-5


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # one training image: one step at batch 1 (BN still has the feature maps' pixels to normalise over)
    return make_data(tmp_path_factory.mktemp("data") / "generated", num_train=1, num_test=1, num_classes=3)


def plain_init(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """In place of orthogonal init (tested in test_models.py): the models' plain (He) weights, whose singular
    values lie far outside every band, and BN scales spread over [0.2, 3], so that SVB and BBN have work to
    do. Returns the names of the init calls made."""
    calls: list[str] = []

    @torch.no_grad()
    def record(module: nn.Module) -> nn.Module:
        calls.append(type(module).__name__)
        generator = torch.Generator().manual_seed(0)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.2, 3.0, generator=generator)
        return module

    monkeypatch.setattr(timm_svb.models._helpers, "orthogonal_init_", record)
    monkeypatch.setattr(timm_svb, "orthogonal_init_", record)
    return calls


def snapshot_before_bounding(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every SVB.apply() of the run: the weights and BN statistics it was given."""
    seen: list[dict[str, Any]] = []
    apply = recipe_loop.RecordingSVB.apply

    def recording(self: Any, per_layer: bool = False) -> Any:
        seen.append({name: _copy(m) for name, m in self.model.named_modules() if _copy(m) is not None})
        return apply(self, per_layer)

    monkeypatch.setattr(recipe_loop.RecordingSVB, "apply", recording)
    return seen


def _copy(module: nn.Module) -> dict[str, np.ndarray] | None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return {
            "weight": module.weight.detach().double().numpy().copy(),
            "groups": getattr(module, "groups", 1),
        }
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        return {
            "gamma": module.weight.detach().double().numpy().copy(),
            "var": module.running_var.detach().double().numpy().copy(),
            "eps": module.eps,
        }
    return None


def svb_reference(weight: np.ndarray, groups: int, epsilon: float) -> tuple[np.ndarray, int]:
    """Singular values of every group's (out/groups) x (in/groups * k * k) matrix clipped to
    [1/(1+eps), 1+eps], in float64; and the number of values clipped."""
    out = np.empty_like(weight)
    clipped = 0
    lo, hi = 1 / (1 + epsilon), 1 + epsilon
    for g, w in enumerate(np.split(weight, groups, axis=0)):
        u, s, vt = np.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
        clipped += int(((s < lo) | (s > hi)).sum())
        rows = slice(g * w.shape[0], (g + 1) * w.shape[0])
        out[rows] = ((u * np.clip(s, lo, hi)) @ vt).reshape(w.shape)
    return out, clipped


def bbn_reference(gamma: np.ndarray, var: np.ndarray, eps: float, bbn_epsilon: float) -> np.ndarray:
    """Algorithm 2 (mode sigma): with sigma = sqrt(var + eps) and alpha = mean(gamma / sigma), a scale whose
    gamma / (sigma * alpha) leaves [1/(1+e), 1+e] is set to sigma * alpha * (1+e) or sigma * alpha / (1+e)."""
    sigma = np.sqrt(var + eps)
    alpha = np.mean(gamma / sigma)
    out = gamma.copy()
    for c in range(len(gamma)):
        ratio = gamma[c] / (sigma[c] * alpha)
        if ratio > 1 + bbn_epsilon:
            out[c] = sigma[c] * alpha * (1 + bbn_epsilon)
        elif ratio < 1 / (1 + bbn_epsilon):
            out[c] = sigma[c] * alpha / (1 + bbn_epsilon)
    return out


def singular_values(weight: np.ndarray) -> np.ndarray:
    return np.linalg.svd(weight.reshape(weight.shape[0], -1), compute_uv=False)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(c, marks=pytest.mark.slow) if c.stem.startswith(("table2", "table3", "table4")) else c
        for c in CONFIGS
    ],
    ids=lambda p: p.stem,
)
def test_config_runs_and_bounds(
    config: Path, generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = recipe_options.parse_args(["-c", str(config)])
    inits = plain_init(monkeypatch)
    before = snapshot_before_bounding(monkeypatch)
    out = tmp_path / "run"
    overrides = "--batch-size 1 --validation-batch-size 1 --stop-after 1 --checkpoint-hist 0 --val-split test"
    overrides += " --svb-every 1 --svb-skip-last 0 --no-svb-skip-final-epoch --spectrum-every 0"
    overrides += " --train-subset 1"
    smaller = next((v for k, v in SMALLER.items() if args.model.startswith(k)), [])
    result = run_recipe(
        ["-c", str(config), *overrides.split(), *smaller, "--data-dir", str(generated), "--output", str(out)]
    )
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == args.model and run["status"] == "stopped"
    assert run["recipe"]["epochs"] == args.epochs and run["recipe"]["lr"] == args.lr
    assert run["recipe"]["steps_per_epoch"] == 1 and len(result.state.history) == 1
    assert len(inits) == 1  # every paper recipe starts from orthogonal weights (here: kept plain)
    row = result.state.history[0]
    assert row["lr"] == args.lr
    # the recorded test error is the saved weights' on the test split
    loader = recipe_data.build_test_loader(run, batch_size=1)
    assert recipe_loop.evaluate(result.model, loader)["top1_err"] == row["top1_err"]
    assert (out / "model_best.safetensors").is_file()
    after = {name: _copy(m) for name, m in result.model.named_modules() if _copy(m) is not None}
    weights = sorted(k for k, v in after.items() if "weight" in v)
    checked = weights[:: max(1, len(weights) // MAX_LAYERS_CHECKED)]

    if args.no_svb:  # SGD: nothing bounded the spectra, which still leave the band of eps 0.5
        assert result.svb is None and run["svb_config"] is None and before == []
        spectra = np.concatenate([singular_values(after[k]["weight"]) for k in checked])
        assert ((spectra < 1 / 1.5) | (spectra > 1.5)).any()
        return
    eps, bbn_eps = args.svb_epsilon, None if args.no_bbn else args.bbn_epsilon
    assert (result.svb.epsilon, result.svb.bbn_epsilon) == (eps, bbn_eps)
    assert run["svb_config"]["epsilon"] == eps and run["svb_config"]["bbn_epsilon"] == bbn_eps
    assert len(before) == result.svb.num_applied == row["svb_applied"] == 1  # after the one step
    (given,) = before
    clipped = 0
    for name in checked:
        expected, n = svb_reference(given[name]["weight"], given[name]["groups"], eps)
        clipped += n
        error = np.linalg.norm(after[name]["weight"] - expected) / np.linalg.norm(expected)
        assert error <= REBUILD_TOL, (name, error)
        s = singular_values(after[name]["weight"])
        assert s.min() >= (1 - EDGE_TOL) / (1 + eps) and s.max() <= (1 + EDGE_TOL) * (1 + eps), name
    assert clipped > 0  # He init: the bounding had work to do
    for name in (k for k, v in after.items() if "gamma" in v):
        b, a = given[name], after[name]  # BN scales: Algorithm 2 with BBN, untouched without
        expected = b["gamma"] if bbn_eps is None else bbn_reference(b["gamma"], b["var"], b["eps"], bbn_eps)
        np.testing.assert_allclose(a["gamma"], expected, rtol=1e-6, atol=1e-7, err_msg=name)
    # the run's record counts what was done: every value clipped, every gamma bounded
    assert row["svb_clipped"] == clipped if checked == weights else row["svb_clipped"] >= clipped
    gammas = [k for k, v in after.items() if "gamma" in v]
    bounded = sum(int((after[k]["gamma"] != before[0][k]["gamma"]).sum()) for k in gammas)
    assert row["bbn_clipped"] == (0 if bbn_eps is None else bounded) and (bbn_eps is None or bounded > 0)
