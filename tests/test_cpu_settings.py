"""benchmarks/cpu_settings.py in a smoke setting: every row printed, the ratios against float32 NCHW eager."""

from __future__ import annotations

import cpu_settings  # benchmarks/cpu_settings.py (conftest.py puts benchmarks/ on sys.path)
import pytest
from recipe_helpers import one_thread  # noqa: F401  (autouse fixture)


@pytest.mark.slow  # bf16 autocast is emulated on CPUs without bf16 instructions: slow even at batch 4
def test_smoke_prints_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--models",
        "convnet20",
        "--batch-sizes",
        "4",
        "8",
        "--rounds",
        "1",
        "--seconds",
        "0",
        "--no-compile",
    ]
    results = cpu_settings.main(argv)
    out = capsys.readouterr().out
    assert "CPU capability" in out and "oneDNN bf16" in out
    # float32 at both batch sizes and both layouts, bf16 at the first batch size only
    assert sorted(results) == sorted(
        [("convnet20", b, False, cl, False) for b in (4, 8) for cl in (False, True)]
        + [("convnet20", 4, True, cl, False) for cl in (False, True)]
    )
    assert all(v > 0 for v in results.values())
    assert out.count("convnet20") == len(results) and " 1.00" in out
