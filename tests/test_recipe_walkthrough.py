"""The fine-tuning walk-through of docs/fine-tuning.md, run as written, offline on the CPU: the weights the
package ships, listed and fine-tuned on the digits with RandAugment, mixup and EMA, validated, plotted."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import safetensors.torch
import torch
from recipe_helpers import REPO, one_thread, optimizer_groups, recipe_trainer, recipe_validate  # noqa: F401

from timm_svb import curves
from timm_svb.models._pretrained import shipped_weights_path

HEADING = "## Fine-tuning walk-through"
SHIPPED = "preact_resnet20_svb.c10jpeg"


def readme_commands(heading: str) -> list[str]:
    """The commands of the first ``bash`` block after ``heading`` in docs/fine-tuning.md: continuation lines
    joined, comments dropped."""
    text = (REPO / "docs" / "fine-tuning.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text[text.index(heading) :], re.DOTALL).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return [line for line in lines if not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_readme_fine_tuning_walk_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = [shlex.split(c) for c in readme_commands(HEADING)]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tuned = validated = None
    for argv in commands:
        if argv[:2] == ["python", "-c"]:
            exec(argv[2], {})  # noqa: S102  (the walk-through's own one-liner)
            assert SHIPPED in capsys.readouterr().out
        elif argv[:2] == ["python", "recipes/train.py"]:
            with optimizer_groups() as steps:
                tuned = recipe_trainer.run_in_process([*argv[2:], "--no-progress"])
        elif argv[:2] == ["python", "recipes/validate.py"]:
            validated = recipe_validate.main(argv[2:])
        elif argv[:3] == ["python", "-m", "timm_svb.curves"]:
            assert curves.main(argv[3:]) == 0
        else:
            raise AssertionError(f"the walk-through runs something this test does not: {argv}")
    assert tuned is not None and validated is not None
    run = json.loads((tuned.run_dir / "run.json").read_text())
    # the shipped weights (10 classes) fine-tuned on the digits' 10, with RandAugment, mixup and an EMA
    assert run["model"] == SHIPPED and run["recipe"]["pretrained"] and run["num_classes"] == 10
    assert run["dataset"]["name"] == "sklearn-digits"
    assert (
        run["recipe"]["aa"].startswith("rand-") and run["recipe"]["mixup"] > 0 and run["recipe"]["model_ema"]
    )
    assert tuned.ema is not None and tuned.svb is not None and tuned.svb.num_applied > 0
    # the shipped classifier (as many classes) was kept and trained
    shipped = safetensors.torch.load_file(str(shipped_weights_path(SHIPPED)))
    assert tuned.model.fc.weight.shape == shipped["fc.weight"].shape
    assert not torch.equal(tuned.model.fc.weight.detach(), shipped["fc.weight"])
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
