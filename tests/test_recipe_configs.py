"""Every paper recipe in recipes/configs/ starts: one training step and a test pass on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from recipe_helpers import RECIPES, make_data, recipe_options, run_recipe

import timm_svb
import timm_svb.models._helpers

CONFIGS = sorted((RECIPES / "configs").glob("*.yaml"))
# WRN-28-10/16 and Inception-ResNet-v2 (36.5M-94.2M parameters): their orthogonal init takes minutes on two
# CPU cores (it is tested in test_models.py); here they start from the models' plain init to stay fast
BIG = ("wrn28_", "inception_resnet")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # one training image: one step at batch 1 (BN still has the feature maps' pixels to normalise over)
    return make_data(tmp_path_factory.mktemp("data") / "generated", num_train=1, num_test=1, num_classes=3)


def keep_plain_init(monkeypatch: pytest.MonkeyPatch) -> None:
    def identity(module):  # noqa: ANN001, ANN202
        return module

    monkeypatch.setattr(timm_svb.models._helpers, "orthogonal_init_", identity)
    monkeypatch.setattr(timm_svb, "orthogonal_init_", identity)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(c, marks=pytest.mark.slow) if c.stem.startswith(("table2", "table3", "table4")) else c
        for c in CONFIGS
    ],
    ids=lambda p: p.stem,
)
def test_config_starts(
    config: Path, generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = recipe_options.parse_args(["-c", str(config)])
    if args.model.startswith(BIG):
        keep_plain_init(monkeypatch)
    out = tmp_path / "run"
    overrides = "--batch-size 1 --validation-batch-size 1 --stop-after 1 --checkpoint-hist 0 --val-split test"
    result = run_recipe(
        ["-c", str(config), *overrides.split(), "--data-dir", str(generated), "--output", str(out)]
    )
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == args.model and run["status"] == "stopped"
    assert run["recipe"]["epochs"] == args.epochs and run["recipe"]["lr"] == args.lr
    assert run["recipe"]["steps_per_epoch"] == 1 and len(result.state.history) == 1
    row = result.state.history[0]
    assert row["lr"] == args.lr and 0 <= row["top1_err"] <= 100
    if args.no_svb:
        assert result.svb is None and run["svb_config"] is None
    else:
        assert result.svb.epsilon == args.svb_epsilon
        assert result.svb.bbn_epsilon == (None if args.no_bbn else args.bbn_epsilon)
    assert (out / "model_best.safetensors").is_file()
