"""The publisher (timm_svb.hub.publish, hub/publish.py), offline: a dry run loads back identically, the zoo
model is checked and evaluated, runs that cannot be recorded or published are refused before any upload, EMA
weights, and pushes to the in-memory stand-in for ``HfApi`` that fail (no token, private, a broken record, a
failure after the push, a racing push). The end-to-end runs are in test_hub_end_to_end.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import timm
import torch
from hub_helpers import (
    EXPECTED_FILES,
    FAKE_TOKEN,
    MODEL,
    NAME,
    REPO_ID,
    TAG,
    HubStandIn,
    _offline,  # noqa: F401  (autouse fixture)
    edit_run,
    empty_record,
    make_run,
    push,
    synthetic_evaluator,
)
from recipe_helpers import one_thread  # noqa: F401  (autouse fixture)
from torch import nn

import timm_svb  # noqa: F401  (registers the zoo)
from timm_svb.hub import publish as pub
from timm_svb.hub.record import file_sha256, read_record


def run_model(run_dir: Path) -> nn.Module:
    """The run's model with its best weights."""
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    return pub.load_run_model(run, run_dir / "model_best.safetensors")


# ------------------------------------------------------------------------------------------ dry run, card


def test_help_documents_dry_run() -> None:
    text = pub.build_parser().format_help()
    for option in ("--dry-run", "OUT_DIR", "--repo-id", "--tolerance", "--require-eval", "--no-record"):
        assert option in text
    assert "--svb-override" in text and "site-packages" in text and "--allow-mismatch" in text


@pytest.mark.slow
def test_dry_run_loads_back_identically(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = pub.publish(
        tiny_run, pub.PublishOptions(repo_id=REPO_ID, dry_run=out), evaluator=synthetic_evaluator
    )
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES == set(summary["files"])
    assert summary["recordable"] and summary["record_name"] == NAME
    assert summary["sha256"] == file_sha256(out / "model.safetensors")

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), run_model(tiny_run)(x))

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == MODEL and config["num_classes"] == 10
    assert config["label_names"] == [f"class{i}" for i in range(10)]
    assert config["svb_config"] == {"epsilon": 0.5, "bbn_epsilon": 1.0, "every_n_steps": 10}
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["tag"] == TAG
    assert cfg["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert cfg["hf_hub_filename"] == "model.safetensors"  # hf-hub: never tries pytorch_model.bin first
    assert not {"file", "hf_hub_id", "url", "source"} & cfg.keys()


@pytest.mark.slow
def test_refuses_metrics_beyond_tolerance(tiny_run: Path, tmp_path: Path) -> None:
    run = json.loads((tiny_run / "run.json").read_text())
    best = {**run["metrics"]["best"], "top1_err": run["metrics"]["best"]["top1_err"] + 2.0}
    run_dir = edit_run(tiny_run, tmp_path / "run", metrics={"best": best, "final": best})
    with pytest.raises(pub.PublishError, match="top1_err .* refusing to publish"):
        pub.publish(
            run_dir,
            pub.PublishOptions(repo_id=REPO_ID, dry_run=tmp_path / "out"),
            evaluator=synthetic_evaluator,
        )
    # within tolerance: accepted
    pub.publish(
        run_dir,
        pub.PublishOptions(repo_id=REPO_ID, dry_run=tmp_path / "out2", tolerance=2.5),
        evaluator=synthetic_evaluator,
    )


@pytest.mark.slow
def test_tags_and_unrecordable_runs(tiny_run: Path, tmp_path: Path) -> None:
    assert pub.default_tag("uoft-cs/cifar10") == "cifar10"
    assert pub.default_tag("ILSVRC/imagenet-1k") == "in1k"
    assert pub.default_tag("sklearn-digits") == "sklearn_digits"
    run = json.loads((tiny_run / "run.json").read_text())
    cfg = {
        **run["pretrained_cfg"],
        "mean": [0.5, 0.5, 0.5],
    }  # preprocessing the zoo cfg cifar10 does not have
    run_dir = edit_run(tiny_run, tmp_path / "run", pretrained_cfg=cfg)
    summary = pub.publish(
        run_dir, pub.PublishOptions(repo_id=REPO_ID, dry_run=tmp_path / "out"), evaluator=synthetic_evaluator
    )
    assert not summary["recordable"] and summary["not_recordable_reason"].startswith("mean:")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]  # the folder keeps the run's own cfg
    summary = pub.publish(
        tiny_run,
        pub.PublishOptions(
            repo_id="timm-svb/convnet20_svb.imagenet", dry_run=tmp_path / "o2", tag="imagenet"
        ),
        evaluator=synthetic_evaluator,
    )
    assert "no pretrained cfg 'convnet20_svb.imagenet'" in summary["not_recordable_reason"]
    summary = pub.publish(  # the record pins MODEL.TAG in the repo timm-svb/MODEL.TAG, nowhere else
        tiny_run,
        pub.PublishOptions(repo_id=f"{REPO_ID}-test", dry_run=tmp_path / "o3"),
        evaluator=synthetic_evaluator,
    )
    assert f"'{REPO_ID}', not '{REPO_ID}-test'" in summary["not_recordable_reason"]


@pytest.mark.slow
def test_zoo_model_must_give_the_runs_outputs_and_is_evaluated(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose model kwargs change the forward pass but not the shapes (global_pool) is not what
    ``create_model(MODEL.TAG, pretrained=True)`` gives: not recordable, and refused before any upload."""
    run_dir = make_run(tmp_path / "maxpool", global_pool="max")
    evaluated = []
    summary = pub.publish(
        run_dir,
        pub.PublishOptions(repo_id=REPO_ID, dry_run=tmp_path / "out"),
        evaluator=lambda model, run: evaluated.append(model) or synthetic_evaluator(model, run),
    )
    assert (
        not summary["recordable"] and "other outputs than the run's model" in summary["not_recordable_reason"]
    )
    assert evaluated[0].global_pool.pool_type == "max"  # not recordable: the folder's own model was evaluated
    api = HubStandIn()
    record = empty_record(tmp_path / "published.json")
    with pytest.raises(pub.PublishError, match="other outputs than the run's model"):
        push(run_dir, api, record=record)
    assert [c for c, _ in api.calls] == [] and read_record(record) == {}

    zoo_models = []
    zoo_model = pub.zoo_model
    monkeypatch.setattr(pub, "zoo_model", lambda *a: zoo_models.append(zoo_model(*a)) or zoo_models[-1])
    evaluated.clear()
    pub.publish(
        tiny_run,
        pub.PublishOptions(repo_id=REPO_ID, dry_run=tmp_path / "out2"),
        evaluator=lambda model, run: evaluated.append(model) or synthetic_evaluator(model, run),
    )
    ((zoo, reason),) = zoo_models
    assert reason is None and evaluated == [zoo]  # the evaluated model is the zoo model
    assert zoo.pretrained_cfg["tag"] == TAG and "pretrained_model_args" not in zoo.pretrained_cfg


@pytest.mark.slow
def test_svb_name_needs_svb_training_or_a_stated_override(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = edit_run(tiny_run, tmp_path / "run", svb_config=None)
    summary = pub.publish(
        run_dir, pub.PublishOptions(repo_id=REPO_ID, dry_run=tmp_path / "o1"), evaluator=synthetic_evaluator
    )
    assert "trained without SVB" in summary["not_recordable_reason"]
    reason = "ablation: orthogonal init only"
    api, record = HubStandIn(), empty_record(tmp_path / "published.json")
    summary = push(run_dir, api, record=record, svb_override=reason)
    entry = read_record(record)[NAME]
    assert entry["svb_config"] is None and entry["svb_override"] == reason
    card = api.files_at(REPO_ID, summary["revision"])["README.md"].decode()
    assert "trained **without** SVB" in card and reason in card


@pytest.mark.slow
def test_refuses_unfinished_runs_and_missing_evaluation(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = edit_run(tiny_run, tmp_path / "run", status="stopped")
    with pytest.raises(pub.PublishError, match="not finished"):
        pub.publish(run_dir, pub.PublishOptions(repo_id=REPO_ID, dry_run=tmp_path / "o1"))
    with pytest.raises(pub.PublishError, match="require-eval"):
        pub.publish(
            tiny_run,
            pub.PublishOptions(repo_id=REPO_ID, dry_run=tmp_path / "o", require_eval=True),
            evaluator=lambda model, run: None,
        )


@pytest.mark.slow
def test_weights_ema_publishes_the_ema_and_says_so(tiny_run: Path, tmp_path: Path) -> None:
    """--weights ema: the run's model_best_ema.safetensors (not the model's), its recorded metrics, the card
    naming the EMA; a run without an EMA is refused."""
    run = json.loads((tiny_run / "run.json").read_text())
    torch.manual_seed(7)
    ema = timm.create_model(MODEL, num_classes=10).eval()
    metrics = {"epoch": 2, **synthetic_evaluator(ema, {})}
    run_dir = edit_run(
        tiny_run,
        tmp_path / "run",
        metrics={**run["metrics"], "best_ema": metrics, "final_ema": metrics},
        recipe={**run["recipe"], "model_ema": True, "model_ema_decay": 0.9998},
    )
    safetensors.torch.save_file(ema.state_dict(), run_dir / "model_best_ema.safetensors")
    out = tmp_path / "out"
    opts = pub.PublishOptions(repo_id=REPO_ID, dry_run=out, weights="ema")
    summary = pub.publish(run_dir, opts, evaluator=synthetic_evaluator)
    assert (
        summary["metrics"]["weights"] == "best_ema" and summary["metrics"]["top1_err"] == metrics["top1_err"]
    )
    published = safetensors.torch.load_file(out / "model.safetensors")
    assert all(torch.equal(published[k], v) for k, v in ema.state_dict().items())
    card = (out / "README.md").read_text()
    assert "exponential moving average of the weights" in card and "decay 0.9998" in card
    assert "bounded by SVB" in card and "`best_ema` weights (epoch 2)" in card
    with pytest.raises(pub.PublishError, match="no EMA"):
        pub.publish(tiny_run, pub.PublishOptions(repo_id=REPO_ID, dry_run=tmp_path / "o2", weights="ema"))
    assert "final_ema" in pub.build_parser().format_help()


@pytest.mark.slow
def test_check_folder_refuses_differences_and_pickles(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pub.publish(tiny_run, pub.PublishOptions(repo_id=REPO_ID, dry_run=out), evaluator=synthetic_evaluator)
    other = timm.create_model(MODEL, num_classes=10).eval()
    with pytest.raises(pub.PublishError, match="differ"):
        pub.check_folder(out, other)
    torch.save({}, out / "pytorch_model.bin")
    with pytest.raises(pub.PublishError, match="pytorch_model.bin"):
        pub.check_folder(out, run_model(tiny_run))


# ---------------------------------------------------------------------------------------------- pushing


def test_push_needs_a_token_and_a_recordable_target(
    tiny_run: Path,
    tmp_path: Path,
    _offline: pytest.MonkeyPatch,  # noqa: F811  (the imported fixture)
) -> None:
    never = HubStandIn()
    with pytest.raises(pub.PublishError, match="no Hugging Face token"):
        pub.publish(
            tiny_run,
            pub.PublishOptions(repo_id=REPO_ID),
            evaluator=synthetic_evaluator,
            api_factory=lambda **kw: never,
        )
    with pytest.raises(pub.PublishError, match="'timm-svb/convnet20_svb.cifar10', not 'someone/convnet'"):
        push(tiny_run, never, repo_id="someone/convnet", record=empty_record(tmp_path / "r.json"))
    assert never.calls == [] and read_record(tmp_path / "r.json") == {}


@pytest.mark.slow
def test_private_repos_are_not_recorded(tiny_run: Path, tmp_path: Path) -> None:
    record = empty_record(tmp_path / "published.json")
    api = HubStandIn()
    with pytest.raises(pub.PublishError, match="--private"):
        push(tiny_run, api, record=record, private=True)
    assert api.calls == []
    api.add_repo(REPO_ID, {}, private=True)  # an existing private repo: found out before any upload
    with pytest.raises(pub.PublishError, match="is private"):
        push(tiny_run, api, record=record)
    assert [c for c, _ in api.calls] == ["repo_info"] and read_record(record) == {}
    other = HubStandIn()
    summary = push(tiny_run, other, repo_id="someone/convnet", private=True, no_record=True)
    assert dict(other.calls)["create_repo"]["private"] is True and "record" not in summary


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "not valid JSON"),
        ('{"convnet20.cifar10": {"hf_hub_id": "timm-svb/convnet20.cifar10"}}', "missing keys"),
        (None, "cannot read the record"),
    ],
)
def test_broken_record_stops_before_any_upload(
    tiny_run: Path, tmp_path: Path, content: str | None, match: str
):
    record = tmp_path / "published.json"
    if content is not None:
        record.write_text(content)
    api = HubStandIn()
    with pytest.raises(pub.PublishError, match=match):
        push(tiny_run, api, record=record)
    assert api.calls == []


@pytest.mark.slow
def test_failure_after_the_push_names_the_revision_and_rerunning_finishes(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    record = empty_record(tmp_path / "published.json")
    api = HubStandIn()

    def corrupting_evaluator(model: nn.Module, run: dict[str, Any]) -> dict[str, float]:
        record.write_text("{")  # the record breaks between the checks and the write (e.g. a bad merge)
        return synthetic_evaluator(model, run)

    monkeypatch.setattr(pub, "HfApi", lambda **kw: api)
    monkeypatch.setattr(
        pub, "recipe_evaluator", lambda model, run, data_dir=None: corrupting_evaluator(model, run)
    )
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    argv = [str(tiny_run), "--repo-id", REPO_ID, "--record", str(record)]
    assert pub.main(argv) == 1
    err = capsys.readouterr().err
    revision = api.head(REPO_ID)
    assert f"pushed revision: {revision}" in err and f"re-run: python hub/publish.py {' '.join(argv)}" in err
    empty_record(record)  # fixed; the same command again: no new commit, the record pins that revision
    monkeypatch.setattr(
        pub, "recipe_evaluator", lambda model, run, data_dir=None: synthetic_evaluator(model, run)
    )
    commits = len(api.repos[REPO_ID]["commits"])
    assert pub.main(argv) == 0
    assert len(api.repos[REPO_ID]["commits"]) == commits and read_record(record)[NAME]["revision"] == revision


@pytest.mark.slow
def test_a_racing_push_records_nothing(tiny_run: Path, tmp_path: Path) -> None:
    record = empty_record(tmp_path / "published.json")
    api = HubStandIn()
    api.add_repo(REPO_ID, {"README.md": b"# earlier"})
    api.before_commit = lambda hub, repo_id: hub.push(repo_id, {"README.md": b"# someone else"})
    with pytest.raises(pub.PublishError, match="upload to .* failed .*nothing was recorded"):
        push(tiny_run, api, record=record)
    assert read_record(record) == {}
    assert api.files_at(REPO_ID, api.head(REPO_ID)) == {"README.md": b"# someone else"}


# ---------------------------------------------------------------------------- loading: no pickle, no lies


# ------------------------------------------------------------------------------- the maintainer's steps
