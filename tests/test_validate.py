"""recipes/validate.py (and recipes/train.py --eval-only): a run folder re-evaluated gives exactly the errors
the run recorded on the same CPU; a weights file, a timm name with a checkpoint and a local-dir: folder give
the same; bad input is named."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
from recipe_helpers import one_thread, recipe_checkpoint, recipe_trainer  # noqa: F401  (autouse fixture)
from recipe_helpers import recipe_validate as validate

import timm_svb  # noqa: F401  (registers the zoo)


@pytest.fixture(scope="module")
def digits(digits_run) -> tuple[Path, dict]:
    """The session's embedded default run (the README's main command) and its run.json."""
    run_dir = digits_run.run_dir
    return run_dir, json.loads((run_dir / "run.json").read_text())


@pytest.mark.slow
def test_run_folder_reproduces_the_recorded_errors(digits: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, run = digits
    for weights in ("best", "final"):
        out = tmp_path / f"{weights}.json"
        results = validate.main([str(run_dir), "--weights", weights, "--results-file", str(out)])
        recorded = run["metrics"][weights]
        # exactly, not approximately: the same weights, images, transform, batch and memory format
        assert (results["top1_err"], results["top5_err"]) == (recorded["top1_err"], recorded["top5_err"])
        assert results["num_images"] == 360 and results["split"] == "test"
        assert json.loads(out.read_text())["recorded"] == recorded
    # the test loss too, as summary.csv holds it (6 significant digits)
    final_row = next(r for r in train_rows(run_dir) if int(r["epoch"]) == run["metrics"]["final"]["epoch"])
    assert f"{results['loss']:.6g}" == final_row["test_loss"]
    # a weights file of the run is the same as naming it
    assert validate.main([str(run_dir / "model_final.safetensors")])["top1_err"] == results["top1_err"]


def train_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "summary.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_model_with_its_own_preprocessing(digits: tuple[Path, dict], tmp_path: Path) -> None:
    """--model NAME --checkpoint FILE, train.py --eval-only and a local-dir: folder: the model's own data
    config (here the run's, the model's default) on the data set named: the run's final errors."""
    run_dir, run = digits
    final = run["metrics"]["final"]
    checkpoint = str(run_dir / "model_final.safetensors")
    common = ["--dataset", "sklearn-digits", "--batch-size", str(run["recipe"]["batch_size"])]
    by_name = validate.main(["--model", "convnet20_svb", "--checkpoint", checkpoint, *common[:2]])
    assert (by_name["top1_err"], by_name["top5_err"]) == (final["top1_err"], final["top5_err"])
    assert by_name["data_config"]["input_size"] == (3, 32, 32)
    evaluated = recipe_trainer.main(
        ["--eval-only", "--initial-checkpoint", checkpoint, *common, "--output", str(tmp_path)]
    )
    assert evaluated["top1_err"] == final["top1_err"]
    assert json.loads((tmp_path / "validate.json").read_text())["top1_err"] == final["top1_err"]
    assert not (tmp_path / "run.json").exists()  # nothing trained
    model = timm.create_model("convnet20_svb")
    recipe_checkpoint.load_weights(model, checkpoint, name="convnet20_svb")
    timm.models.save_for_hf(model, str(tmp_path / "hub"), safe_serialization=True)
    local = validate.main(["--model", f"local-dir:{tmp_path / 'hub'}", *common[:2]])
    assert local["top1_err"] == final["top1_err"]


@pytest.mark.slow  # builds the digits set (seconds)
def test_bad_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        validate.main([])
    with pytest.raises(SystemExit, match="run.json"):
        validate.main([str(tmp_path)])
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(SystemExit, match="--weights picks one"):
        validate.main([str(tmp_path), "--weights", "best_ema"])
    with pytest.raises(SystemExit, match="no weights to evaluate"):
        validate.main(["--model", "convnet20_svb"])
    weights = tmp_path / "w.safetensors"
    safetensors.torch.save_file(timm.create_model("convnet20_svb", num_classes=7).state_dict(), str(weights))
    with pytest.raises(SystemExit, match="--num-classes"):
        validate.main(["--model", "convnet20_svb", "--checkpoint", str(weights), "--num-classes", "10"])
