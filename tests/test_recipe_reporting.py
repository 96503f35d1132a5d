"""timm_svb.recipe.reporting, without a run: the SVB log line and summary.csv row."""

from __future__ import annotations

import timm
import torch
from recipe_helpers import (
    one_thread,  # noqa: F401  (autouse fixture)
    recipe_loop,
    recipe_reporting,
)

import timm_svb  # noqa: F401  (registers the zoo)


def test_svb_log_and_summary_when_the_certificate_proves_every_layer_in_band():
    # certified layers get no solver, so no singular values: the log says so and summary.csv leaves the cells
    # empty instead of writing NaN
    model = timm.create_model("convnet20_svb", num_classes=10)  # orthogonal init: every layer in band
    svb = recipe_loop.RecordingSVB(model, epsilon=0.5)
    stats = svb.apply()
    assert stats.certified == stats.layers == 20
    assert recipe_reporting.describe_svb(stats) == "20/20 layers certified in band, 0 clipped"
    row = recipe_reporting.svb_row(svb, applied_before=0)
    assert row["svb_sv_min"] is None and row["svb_sv_max"] is None and row["svb_clipped"] == 0
    with torch.no_grad():
        model.get_classifier().weight.mul_(3.0)  # the head leaves the band: the solver sees it alone
    stats = svb.apply()
    described = recipe_reporting.describe_svb(stats)
    assert described.startswith("19/20 layers certified in band, sv ") and "nan" not in described
    row = recipe_reporting.svb_row(svb, applied_before=0)
    assert row["svb_sv_max"] > 1.5 and row["svb_clipped"] > 0
