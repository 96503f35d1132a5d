"""The README's fine-tuning walk-through, run as written, offline on the CPU: the embedded default (the
session's shared digits run), a generated data set of another number of classes, fine-tuning with RandAugment,
mixup and EMA, validating, plotting."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from recipe_helpers import REPO, one_thread, optimizer_groups, recipe_validate, train  # noqa: F401

from timm_svb import curves

HEADING = "### Fine-tuning walk-through"


def readme_commands(heading: str) -> list[str]:
    """The commands of the first ``bash`` block after ``heading`` in the README: continuation lines joined,
    comments dropped."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text[text.index(heading) :], re.DOTALL).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return [line for line in lines if not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_readme_fine_tuning_walk_through(digits_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = [shlex.split(c) for c in readme_commands(HEADING)]
    # step 1 is the README's main command (the session's run of `python recipes/train.py`) into runs/digits
    assert commands[0] == ["python", "recipes/train.py", "--output", "runs/digits"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "digits").symlink_to(digits_run.run_dir)
    tuned = validated = None
    for argv in commands[1:]:
        if argv[:2] == ["python", "-c"]:
            exec(argv[2], {})  # noqa: S102  (the README's own one-liner)
        elif argv[:2] == ["python", "recipes/train.py"]:
            with optimizer_groups() as steps:
                tuned = train.run_in_process([*argv[2:], "--no-progress"])
        elif argv[:2] == ["python", "recipes/validate.py"]:
            validated = recipe_validate.main(argv[2:])
        elif argv[:3] == ["python", "-m", "timm_svb.curves"]:
            assert curves.main(argv[3:]) == 0
        else:
            raise AssertionError(f"the walk-through runs something this test does not: {argv}")
    assert tuned is not None and validated is not None
    run = json.loads((tuned.run_dir / "run.json").read_text())
    # the digits checkpoint (10 classes) fine-tuned on 6 classes, with RandAugment, mixup and an EMA
    assert run["num_classes"] == 6 and run["recipe"]["initial_checkpoint"].endswith("model_best.safetensors")
    assert (
        run["recipe"]["aa"].startswith("rand-") and run["recipe"]["mixup"] > 0 and run["recipe"]["model_ema"]
    )
    assert tuned.model.fc.weight.shape[0] == 6 and tuned.ema is not None
    # fine-tuning: no weight decay on 1-D tensors (BN, biases); the new head at --head-lr-scale
    scale = run["recipe"]["head_lr_scale"]
    assert run["recipe"]["filter_bias_and_bn"] is True and scale > 1
    for groups in steps:
        base = next(g["lr"] for g in groups if "lr_scale" not in g)
        for g in groups:
            assert all((len(shape) <= 1) == (g["weight_decay"] == 0) for shape in g["shapes"])
            assert g["lr"] == pytest.approx(base * g.get("lr_scale", 1.0)) and g.get("lr_scale", 1.0) in (
                1,
                scale,
            )
    assert {g.get("lr_scale") for g in steps[0]} == {None, scale}
    # the EMA weights validated: exactly the errors the run recorded for them
    recorded = run["metrics"]["best_ema"]
    assert (validated["top1_err"], validated["top5_err"]) == (recorded["top1_err"], recorded["top5_err"])
    assert validated["weights"].endswith("model_best_ema.safetensors")
    for png in (tuned.run_dir / "curves.png", tmp_path / "curves.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
