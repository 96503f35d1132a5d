"""benchmarks/gpu_check.py in its CPU smoke mode, in this process: a crash on a lent GPU costs the lease."""

from __future__ import annotations

import gpu_check  # benchmarks/gpu_check.py (conftest.py puts benchmarks/ on sys.path)
import pytest
import timm
import torch
from recipe_helpers import one_thread  # noqa: F401  (autouse fixture)

from timm_svb import SVB


@pytest.mark.slow
def test_smoke_mode_prints_the_table_with_errors_against_float64(capsys: pytest.CaptureFixture[str]) -> None:
    rows = gpu_check.main(["--device", "cpu", "--small", "--steps", "4"])
    out = capsys.readouterr().out
    assert [row.model for row in rows] == ["preact_resnet20_svb", "convnet20_svb"]
    assert "ignoring arguments meant for recipe_throughput.py: --steps 4" in out
    assert "| " + " | ".join(gpu_check.HEADER) + " |" in out
    for row in rows:
        assert "| " + " | ".join(row.cells()) + " |" in out
        assert row.he_clipped > 0  # He init is out of band: the solver rebuilt layers
        assert 0 < row.mid_certified <= row.layers
        assert row.he_err < 1e-4 and row.mid_err < 1e-4  # the accuracy contract, against float64
        assert min(row.he_ms, row.mid_ms, row.step_ms) > 0


def test_models_past_the_budget_are_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--device", "cpu", "--models", "convnet20_svb:2", "--budget", "-1"]) == []
    assert "convnet20_svb: skipped, past the -1 s budget" in capsys.readouterr().out


def test_the_float64_reference_bounds_what_it_is_given() -> None:
    model = timm.create_model("convnet20_svb")
    gpu_check.he_init_state(model, seed=0)
    svb = SVB(model, epsilon=0.5)
    reference = gpu_check.float64_reference(svb)
    lo, hi = 1 / 1.5, 1.5
    for layer in svb.layers:
        s = torch.linalg.svdvals(reference[layer.name].reshape(reference[layer.name].shape[0], -1))
        assert lo - 1e-12 <= s.min() and s.max() <= hi + 1e-12, layer.name
    # He init leaves layers out of band, so the untouched model is far from the reference
    assert gpu_check.max_relative_difference(svb, reference) > 1e-2
