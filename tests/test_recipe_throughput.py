"""benchmarks/recipe_throughput.py in its CPU smoke mode, in this process (what gpu_check.sh runs last)."""

from __future__ import annotations

import math

import pytest
import recipe_throughput  # benchmarks/recipe_throughput.py (conftest.py puts benchmarks/ on sys.path)
from recipe_helpers import one_thread  # noqa: F401  (autouse fixture)


@pytest.mark.slow
def test_smoke_mode_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    result = recipe_throughput.main(["--device", "cpu", "--small", "--gpu-check-option"])
    out = capsys.readouterr().out
    for row in (
        "bare step",
        "recipe, per-image loader",
        "recipe, in memory",
        "recipe, in memory, SVB+BBN",
        "ignoring arguments meant for gpu_check.py",
        "generated 64 images",  # --small never reads the real copy
    ):
        assert row in out
    for key in ("bare", "recipe_loader", "recipe_memory", "recipe_memory_svb"):
        assert result[key] > 0 and math.isfinite(result[key])
    assert result["recipe_memory_ratio"] == pytest.approx(result["recipe_memory"] / result["bare"])
    assert result["svb_applied"] == 1  # the measured epoch of the SVB run paid one bounding
