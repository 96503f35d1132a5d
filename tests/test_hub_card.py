"""The model card (timm_svb.hub.card) of a published folder: Hub metric ids, no local paths, what the run
did against what its tag claims."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from hub_helpers import (
    NAME,
    REPO_ID,
    TAG,
    HubStandIn,
    _offline,  # noqa: F401  (autouse fixture)
    edit_run,
    empty_record,
    push,
    synthetic_evaluator,
)
from huggingface_hub import ModelCard
from recipe_helpers import one_thread  # noqa: F401  (autouse fixture)

import timm_svb  # noqa: F401  (registers the zoo)
from timm_svb.hub import publish as pub
from timm_svb.hub.record import read_record

# every test publishes a run (evaluated, its card and spectrum written)
pytestmark = pytest.mark.slow


def test_card_fields(tiny_run: Path, tmp_path: Path) -> None:
    """Hub metric ids (accuracy = 100 - error), no "None" split, no local paths, base_model of a fine-tuned
    run, and no zoo claim before a release ships the record."""
    run = json.loads((tiny_run / "run.json").read_text())
    recipe = {
        **run["recipe"],
        "output": str(tmp_path / "runs" / "x"),
        "data_dir": str(tmp_path / "data"),
        "config": str(tmp_path / "cfg.yaml"),
        "resume": str(tmp_path / "runs" / "x" / "checkpoints"),
        "pretrained": True,
    }
    pretrained_cfg = {**run["pretrained_cfg"], "hf_hub_id": "timm-svb/convnet20_svb.cifar100@" + "a" * 40}
    dataset = {**run["dataset"], "test_split": None, "data_dir": str(tmp_path / "data")}
    run_dir = edit_run(
        tiny_run, tmp_path / "run", recipe=recipe, pretrained_cfg=pretrained_cfg, dataset=dataset
    )
    out = tmp_path / "out"
    pub.publish(run_dir, pub.PublishOptions(repo_id=REPO_ID, dry_run=out), evaluator=synthetic_evaluator)
    card = ModelCard.load(out / "README.md")
    recorded = run["metrics"]["best"]
    results = {r.metric_name: r for r in card.data.eval_results}
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy"} and card.data.metrics == [
        "accuracy"
    ]
    assert results["Top-1 accuracy (%)"].metric_value == pytest.approx(100 - recorded["top1_err"], abs=1e-4)
    assert results["Top-5 accuracy (%)"].metric_value == pytest.approx(100 - recorded["top5_err"], abs=1e-4)
    # the data as given: the local folder (shortened), not the Hub id it was given as
    assert results["Top-1 accuracy (%)"].dataset_name == "<local>/data" and card.data.datasets is None
    assert "trained on `<local>/data` (a local folder, given as `uoft-cs/cifar10`)" in card.content
    assert all(r.dataset_split is None for r in card.data.eval_results)
    assert "None" not in card.content and "lower is better" in card.content
    assert card.data.base_model == "timm-svb/convnet20_svb.cifar100"
    for text in (
        "@inproceedings{jia2017improving",
        "num_classes=5",
        '"lr": 0.1',
        "re-evaluation",
        "bbn_epsilon",
    ):
        assert text in card.content
    assert "![Singular values of every weight layer](spectrum.png)" in card.content
    assert "model zoo" not in card.content  # a dry run records nothing
    for f in out.iterdir():
        assert str(tmp_path).encode() not in f.read_bytes(), f.name
    card = pub.build_model_card(
        repo_id=REPO_ID, run=run, metrics=recorded, checked=None, record_name=NAME, num_params=1
    )
    assert "From the first `timm-svb` release that ships the record" in card.content
    assert card.data.base_model is None  # trained from scratch


def test_card_states_what_the_run_did_and_recording_checks_the_tags_claim(
    tiny_run: Path, tmp_path: Path
) -> None:
    """A 1-epoch run of a 160-epoch config that read a local folder and never applied SVB (the issue's
    ``--dry-run``): not recordable as ``.cifar10``, and its card says what it did. Each claim is checked on
    its own; ``--allow-mismatch REASON`` records it anyway, stated on the card and in the record."""
    run = json.loads((tiny_run / "run.json").read_text())
    local = {**run["dataset"], "data_dir": str(tmp_path / "cifar10-local")}
    run_dir = edit_run(
        tiny_run, tmp_path / "run", epochs=1, completed_epochs=1, svb_applied_total=0, dataset=local
    )
    summary = pub.publish(
        run_dir, pub.PublishOptions(repo_id=REPO_ID, dry_run=tmp_path / "o"), evaluator=synthetic_evaluator
    )
    assert not summary["recordable"] and "SVB never applied" in summary["not_recordable_reason"]
    assert summary["run"]["completed_epochs"] == 1 and summary["run"]["config_epochs"] == 160
    card = (tmp_path / "o" / "README.md").read_text()
    assert "trained on `<local>/cifar10-local` (a local folder, given as `uoft-cs/cifar10`)" in card
    assert "Trained 1 epochs of the run's 1 (recipe config `fig2_convnet20_svb`: 160 epochs)" in card
    assert "applied it **0 times**" in card and "Trained with Singular Value Bounding" not in card
    assert "uoft-cs/cifar10 |" not in card  # the results table names the local folder
    weights, config = (tmp_path / "o" / n for n in ("model.safetensors", "config.json"))
    assert stat.S_IMODE(weights.stat().st_mode) == stat.S_IMODE(config.stat().st_mode)  # not 0600

    facts = pub.run_facts(run, tiny_run)
    assert pub.claim_mismatch(TAG, facts) is None  # the tiny run: the Hub set, the config's 160 epochs
    short = {**facts, "completed_epochs": 1}
    assert "claims the full schedule" in pub.claim_mismatch(
        TAG, short
    ) and "cifar10_e1" in pub.claim_mismatch(TAG, short)
    assert pub.claim_mismatch("cifar10_e1", short) is None
    assert "claims 30 epochs" in pub.claim_mismatch("cifar10_e30", short)
    assert "claims the data" in pub.claim_mismatch(
        TAG, {**facts, "data_source": "/x/c10", "local_data": True}
    )
    assert "no known data" in pub.claim_mismatch("mnist", facts)
    # a local JPEG copy of CIFAR-10 on a 30-epoch schedule, tagged as such: the claim holds
    jpeg = {"name": "CIFAR-10 (JPEG q75 copy)", "data_dir": "../shared/data/cifar10-jpeg"}
    honest = pub.run_facts({**run, "dataset": jpeg, "epochs": 30, "completed_epochs": 30}, tiny_run)
    assert pub.claim_mismatch("c10jpeg_e30", honest) is None
    assert "claims the data" in pub.claim_mismatch("cifar10_e30", honest)
    assert "claims the data" in pub.claim_mismatch("c10jpeg_e30", {**honest, "local_data": False})

    short_run = edit_run(tiny_run, tmp_path / "short", epochs=1, completed_epochs=1, svb_applied_total=1)
    api, record = HubStandIn(), empty_record(tmp_path / "published.json")
    with pytest.raises(pub.PublishError, match="claims the full schedule.*--allow-mismatch"):
        push(short_run, api, record=record)
    assert api.calls == [] and read_record(record) == {}
    reason = "a smoke test of the publishing path"
    summary = push(short_run, api, record=record, allow_mismatch=reason)
    entry = read_record(record)[NAME]
    assert (
        entry["allow_mismatch"].startswith(reason) and "claims the full schedule" in entry["allow_mismatch"]
    )
    card = api.files_at(REPO_ID, summary["revision"])["README.md"].decode()
    assert "**Recorded with a stated override** (`--allow-mismatch`): " + reason in card
