"""Publishing weights (hub/publish.py), fully offline: dry run, load back, the zoo model checked and
evaluated, push to an in-memory stand-in for ``HfApi`` (huggingface_hub's own ``upload_folder``), the record
(checked before any upload, validated, mode kept, locked), ``pretrained=True`` from the record through a
temporary Hugging Face cache on every loading path with sha256 verification, no pickle ever, and the
README's maintainer steps end to end."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import timm
import torch
from hub_helpers import (
    REPO_ROOT,
    HubStandIn,
    child_env,
    fake_commit,
    folder_files,
    offline_hf,
    place_in_hf_cache,
    publish_fake,
    run_record_tests,
    write_json,
)
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError
from torch import nn

import timm_svb  # noqa: F401  (registers the zoo)
from timm_svb.hub import publish as pub
from timm_svb.hub import record as hub_record
from timm_svb.hub.record import RecordError, file_sha256, read_record, record_path, write_record
from timm_svb.models import _pretrained as pretrained_record
from timm_svb.models._pretrained import PretrainedWeightsFormatError, PretrainedWeightsIntegrityError

MODEL = "convnet20_svb"
TAG = "cifar10"
NAME = f"{MODEL}.{TAG}"
REPO_ID = f"timm-svb/{NAME}"
FAKE_TOKEN = "hf_FAKEtokenFORtests0123456789abcdefXYZ"
EXPECTED_FILES = {"README.md", "config.json", "model.safetensors", "spectrum.png"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a loaded 2-core machine more threads spin and make small QRs ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path):
    with offline_hf(tmp_path / "hf") as mp:
        yield mp


def synthetic_test_set() -> tuple[torch.Tensor, torch.Tensor]:
    """A small fixed test split (CIFAR-shaped) for the tiny run."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 10, (48,), generator=g)


def synthetic_evaluator(model: nn.Module, run: dict[str, Any]) -> dict[str, float]:
    """Top-1 / top-5 error (percent) on the synthetic test split."""
    x, y = synthetic_test_set()
    with torch.no_grad():
        top5 = model.eval()(x).topk(5, dim=1).indices
    return {
        "top1_err": 100.0 * (top5[:, 0] != y).float().mean().item(),
        "top5_err": 100.0 * (~(top5 == y[:, None]).any(dim=1)).float().mean().item(),
    }


def make_run(run_dir: Path, **model_kwargs: Any) -> Path:
    """A tiny run folder as recipes/train.py writes it; its metrics are measured on the synthetic split."""
    run_dir.mkdir(parents=True)
    torch.manual_seed(0)
    model_kwargs = {"num_classes": 10, **model_kwargs}
    model = timm.create_model(MODEL, **model_kwargs).eval()
    with torch.no_grad():  # move away from the init so that a wrong load would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    safetensors.torch.save_file(model.state_dict(), run_dir / "model_best.safetensors")
    safetensors.torch.save_file(model.state_dict(), run_dir / "model_final.safetensors")
    metrics = {"epoch": 160, **synthetic_evaluator(model, {})}
    run = {
        "model": MODEL,
        "model_kwargs": model_kwargs,
        "num_classes": 10,
        "svb_config": {"epsilon": 0.5, "bbn_epsilon": 1.0, "every_n_steps": 10},
        "dataset": {
            "name": "uoft-cs/cifar10",
            "test_split": "test",
            "label_names": [f"class{i}" for i in range(10)],
            "num_test_images": 48,
        },
        # what the tag cifar10 claims: the Hub set, the full schedule of a recipe config, SVB applied
        "recipe": {"config": "fig2_convnet20_svb", "epochs": 160, "lr": 0.1, "batch_size": 16},
        "epochs": 160,
        "completed_epochs": 160,
        "svb_applied_total": 159,
        "metrics": {"best": metrics, "final": metrics},
        "pretrained_cfg": timm.data.resolve_model_data_config(model),
        "timm_svb_version": timm_svb.__version__,
    }
    (run_dir / "run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
    return run_dir


def edit_run(src: Path, dst: Path, **changes: Any) -> Path:
    """A copy of run folder ``src`` with top-level ``run.json`` entries replaced."""
    shutil.copytree(src, dst)
    run = json.loads((dst / "run.json").read_text())
    (dst / "run.json").write_text(json.dumps({**run, **changes}))
    return dst


def run_model(run_dir: Path) -> nn.Module:
    """The run's model with its best weights."""
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    return pub.load_run_model(run, run_dir / "model_best.safetensors")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "tiny")


def empty_record(path: Path) -> Path:
    """A record file ``{}`` with the usual mode of a checked-out file."""
    write_json(path, {})
    os.chmod(path, 0o644)
    return path


def push(run_dir: Path, api: HubStandIn, evaluator: Any = synthetic_evaluator, **opts: Any) -> dict[str, Any]:
    """``publish`` to the stand-in with a fake token."""
    opts = {"repo_id": REPO_ID, **opts}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", FAKE_TOKEN)
        return pub.publish(
            run_dir,
            pub.PublishOptions(**opts),
            evaluator=evaluator,
            api_factory=lambda **kw: (api.init_kwargs.update(kw), api)[1],
        )


@pytest.fixture(scope="module")
def pushed(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Publish the tiny run to the stand-in, over an earlier publish that left other files in the repo, with a
    record of two other entries; capture every output."""
    root = tmp_path_factory.mktemp("pushed")
    cache = root / "cache"
    record = write_json(
        root / "published.json",
        publish_fake(["preact_resnet20.cifar10", "convnet20.cifar100"], cache, root / "w"),
    )
    os.chmod(record, 0o644)
    api = HubStandIn()
    stale = api.add_repo(
        REPO_ID, {"pytorch_model.bin": b"old pickle", "model.safetensors": b"old", "x/y.txt": b""}
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    try:
        with (
            offline_hf(root / "hf"),
            contextlib.redirect_stdout(stream),
            contextlib.redirect_stderr(stream),
        ):
            summary = push(tiny_run, api, record=record)
            print(json.dumps(summary))
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(old_level)
    return {
        "summary": summary,
        "record": record,
        "cache": cache,
        "api": api,
        "stale": stale,
        "output": stream.getvalue(),
    }


# ------------------------------------------------------------------------------------------ dry run, card


def test_help_documents_dry_run() -> None:
    text = pub.build_parser().format_help()
    for option in ("--dry-run", "OUT_DIR", "--repo-id", "--tolerance", "--require-eval", "--no-record"):
        assert option in text
    assert "--svb-override" in text and "site-packages" in text and "--allow-mismatch" in text


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


def test_cli_dry_run_without_test_data(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "hub" / "publish.py"), str(tiny_run), "--repo-id", REPO_ID]
        + ["--dry-run", str(out)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["dry_run"] == str(out) and summary["metrics"]["reevaluated"] is None
    assert "not re-evaluated" in proc.stderr
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES


def test_script_does_not_shadow_the_imported_timm_svb(tmp_path: Path) -> None:
    """``python hub/publish.py`` imports the ``timm_svb`` Python finds (here a copy on PYTHONPATH standing for
    an installed one), not the checkout's, and leaves sys.path alone."""
    site = tmp_path / "site"
    shutil.copytree(REPO_ROOT / "timm_svb", site / "timm_svb", ignore=shutil.ignore_patterns("__pycache__"))
    script = textwrap.dedent(
        f"""
        import runpy, sys
        sys.argv = ["hub/publish.py", "--help"]
        try:
            runpy.run_path({str(REPO_ROOT / "hub" / "publish.py")!r}, run_name="__main__")
        except SystemExit:
            pass
        import timm_svb
        print(timm_svb.__file__)
        print({str(REPO_ROOT)!r} in sys.path)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**child_env(), "PYTHONPATH": str(site)},
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    imported, repo_on_path = proc.stdout.strip().splitlines()[-2:]
    assert imported == str(site / "timm_svb" / "__init__.py") and repo_on_path == "False"


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


def test_push_holds_exactly_the_checked_files_and_never_the_token(pushed: dict[str, Any]) -> None:
    api, summary = pushed["api"], pushed["summary"]
    assert "token" not in api.init_kwargs  # resolved by huggingface_hub itself (env / login cache)
    assert [name for name, _ in api.calls] == ["repo_info", "upload_folder", "validate_yaml", "create_commit"]
    upload = dict(api.calls)["upload_folder"]
    assert upload["repo_id"] == REPO_ID and upload["delete_patterns"] == "*"
    assert upload["parent_commit"] == pushed["stale"]  # on top of the commit it checked, or not at all
    assert upload["commit_message"].startswith(f"Add {NAME} weights (uoft-cs/cifar10: top-1 err ")
    assert "token" not in upload
    files = api.files_at(REPO_ID, summary["revision"])  # the earlier publish's files are gone
    assert set(files) == EXPECTED_FILES | {".gitattributes"} == set(summary["files"]) | {".gitattributes"}

    record = read_record(pushed["record"])
    assert sorted(record) == sorted(["convnet20.cifar100", "preact_resnet20.cifar10", NAME])
    entry = record[NAME]
    assert entry["hf_hub_id"] == REPO_ID and entry["revision"] == summary["revision"] == api.head(REPO_ID)
    assert entry["sha256"] == summary["sha256"] == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert entry["svb_config"] == {"epsilon": 0.5, "bbn_epsilon": 1.0, "every_n_steps": 10}
    assert entry["metrics"]["reevaluated"] is not None
    assert stat.S_IMODE(pushed["record"].stat().st_mode) == 0o644  # not mkstemp's 0600

    assert "pushed" in pushed["output"]  # the capture did see the logs
    assert FAKE_TOKEN not in pushed["output"] and FAKE_TOKEN not in pushed["record"].read_text()
    for data in files.values():
        assert FAKE_TOKEN.encode() not in data


def test_push_needs_a_token_and_a_recordable_target(
    tiny_run: Path, tmp_path: Path, _offline: pytest.MonkeyPatch
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


def test_a_racing_push_records_nothing(tiny_run: Path, tmp_path: Path) -> None:
    record = empty_record(tmp_path / "published.json")
    api = HubStandIn()
    api.add_repo(REPO_ID, {"README.md": b"# earlier"})
    api.before_commit = lambda hub, repo_id: hub.push(repo_id, {"README.md": b"# someone else"})
    with pytest.raises(pub.PublishError, match="upload to .* failed .*nothing was recorded"):
        push(tiny_run, api, record=record)
    assert read_record(record) == {}
    assert api.files_at(REPO_ID, api.head(REPO_ID)) == {"README.md": b"# someone else"}


ENTRY = {"hf_hub_id": "", "revision": "a" * 40, "sha256": "b" * 64, "metrics": {}, "svb_config": None}


def _write_entries(args: tuple[str, list[str]]) -> None:
    path, names = args
    for name in names:
        write_record(path, name, {**ENTRY, "hf_hub_id": f"timm-svb/{name}"})


def test_concurrent_record_writes_keep_every_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = empty_record(tmp_path / "published.json")
    read = hub_record.read_record
    monkeypatch.setattr(hub_record, "read_record", lambda *a, **k: (read(*a, **k), time.sleep(0.02))[0])
    jobs = [(str(record), [f"convnet20.tag{p}_{i}" for i in range(6)]) for p in range(4)]
    with multiprocessing.get_context("fork").Pool(4) as pool:  # forked: the slowed read is inherited
        pool.map(_write_entries, jobs)
    assert len(read_record(record)) == 24


def test_record_path_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert record_path() == REPO_ROOT / "timm_svb" / "models" / "published.json"  # this source checkout
    installed = tmp_path / "lib" / "site-packages" / "timm_svb" / "models" / "published.json"
    with pytest.raises(RecordError, match="inside an installed package"):
        record_path(installed)
    monkeypatch.setattr(hub_record, "default_record_path", lambda: installed)
    with pytest.raises(RecordError, match="inside an installed package"):
        record_path()
    monkeypatch.setattr(hub_record, "default_record_path", lambda: tmp_path / "a" / "b" / "published.json")
    with pytest.raises(RecordError, match="not in a source checkout"):
        record_path()
    assert record_path(tmp_path / "mine.json") == (tmp_path / "mine.json").resolve()


def test_invalid_record_entries_are_refused_on_write(tmp_path: Path) -> None:
    record = empty_record(tmp_path / "published.json")
    good = {**ENTRY, "hf_hub_id": "timm-svb/convnet20.cifar10"}
    for bad, match in [
        ({**good, "revision": "main"}, "40-hex"),
        ({**good, "sha256": "deadbeef"}, "64 hex"),
        ({**good, "hf_hub_id": "timm-svb/convnet20.cifar10-test"}, "must be 'timm-svb/convnet20.cifar10'"),
    ]:
        with pytest.raises(RecordError, match=match):
            write_record(record, "convnet20.cifar10", bad)
    with pytest.raises(RecordError, match="SVB settings"):
        write_record(record, "convnet20_svb.cifar10", {**good, "hf_hub_id": "timm-svb/convnet20_svb.cifar10"})
    assert read_record(record) == {}


# ---------------------------------------------------------------------------- loading: no pickle, no lies


class _Trap:
    """Unpickling it writes a flag file (stands for arbitrary code in a malicious pickle)."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.flag, "unpickled"))


def test_a_pickle_is_never_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo / folder with only config.json + pytorch_model.bin: nothing is unpickled on any path."""
    flag, folder = tmp_path / "flag", tmp_path / "pickle_only"
    model = timm.create_model(MODEL)
    timm.models.save_for_hf(model, str(folder), safe_serialization=False)  # config.json + pytorch_model.bin
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"stem.conv.weight": _Trap(flag)}, f)
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load called"))
    revision = fake_commit("pickle")
    place_in_hf_cache(folder_files(folder), "someone/pickle-only", revision, Path(os.environ["HF_HUB_CACHE"]))
    with pytest.raises(PretrainedWeightsFormatError, match="model.safetensors .*No such file"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    with pytest.raises(EntryNotFoundError):  # asks the Hub for model.safetensors only, never the pickle
        timm.create_model(f"hf-hub:someone/pickle-only@{revision}", pretrained=True)
    with pytest.raises(PretrainedWeightsFormatError, match="not a safetensors file"):
        timm.create_model(
            MODEL, pretrained=True, pretrained_cfg_overlay={"file": str(folder / "pytorch_model.bin")}
        )
    assert calls == [] and not flag.exists()


def test_config_files_cannot_control_loading(tmp_path: Path) -> None:
    """``model_args`` of a config.json (local-dir: or hf-hub:) that are not architecture arguments, or SVB
    bands that are not finite numbers > 0, are refused: no silent non-strict load of a checkpoint missing a
    stage."""
    model = timm.create_model(MODEL)
    for i, (args, match) in enumerate(
        [
            ({"pretrained_strict": False}, r"\['pretrained_strict'\]"),
            (
                {"pretrained_filter_fn": None, "kwargs_filter": ["x"]},
                r"\['kwargs_filter', 'pretrained_filter_fn'\]",
            ),
            ({"svb_epsilon": -0.5}, "svb_epsilon=-0.5"),
            ({"svb_epsilon": "0.5"}, "svb_epsilon='0.5'"),
            ({"bbn_epsilon": float("nan")}, "bbn_epsilon=nan"),
        ]
    ):
        folder = tmp_path / f"f{i}"
        timm.models.save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
        sd = safetensors.torch.load_file(folder / "model.safetensors")
        safetensors.torch.save_file(
            {k: v for k, v in sd.items() if not k.startswith("stages.2")}, folder / "model.safetensors"
        )
        revision = fake_commit(str(i))
        place_in_hf_cache(folder_files(folder), f"someone/cfg{i}", revision, Path(os.environ["HF_HUB_CACHE"]))
        for spec in (f"local-dir:{folder}", f"hf-hub:someone/cfg{i}@{revision}"):
            with pytest.raises(ValueError, match=match):
                timm.create_model(spec, pretrained=True)
    for epsilon in (0.2, 2.0):  # the publisher's own config: architecture arguments, any band training takes
        folder = tmp_path / f"ok{epsilon}"
        model = timm.create_model(MODEL, svb_epsilon=epsilon)
        timm.models.save_for_hf(model, str(folder), safe_serialization=True)
        assert timm.create_model(f"local-dir:{folder}", pretrained=True).svb_config["epsilon"] == epsilon


def _saved_folder(folder: Path, model: nn.Module, **save_kwargs: Any) -> Path:
    """``model`` saved with timm's ``save_for_hf`` (safetensors) into ``folder``."""
    timm.models.save_for_hf(model, str(folder), safe_serialization=True, **save_kwargs)
    return folder


def _loaders(folder: Path, repo_id: str) -> dict[str, Any]:
    """Every way to load ``folder`` with keyword arguments: ``local-dir:``, ``hf-hub:`` at a pinned commit
    (the folder laid out in the Hub cache) and a file overlay."""
    revision = fake_commit(repo_id)
    place_in_hf_cache(folder_files(folder), repo_id, revision, Path(os.environ["HF_HUB_CACHE"]))
    weights = str(folder / "model.safetensors")
    return {
        "local-dir": lambda **kw: timm.create_model(f"local-dir:{folder}", pretrained=True, **kw),
        "hf-hub": lambda **kw: timm.create_model(f"hf-hub:{repo_id}@{revision}", pretrained=True, **kw),
        "overlay": lambda **kw: timm.create_model(
            MODEL, pretrained=True, pretrained_cfg_overlay={"file": weights}, **kw
        ),
    }


def test_loading_for_another_num_classes_is_strict_but_for_the_head(tmp_path: Path) -> None:
    """A weights file missing a conv loads on no path, also for another ``num_classes`` (where timm turns
    strictness off): only the classifier is adapted; a complete file loads every other weight."""
    torch.manual_seed(3)
    model = timm.create_model(MODEL).eval()
    damaged = _saved_folder(tmp_path / "damaged", model)
    sd = safetensors.torch.load_file(damaged / "model.safetensors")
    del sd["stages.0.3.conv.weight"]
    safetensors.torch.save_file(sd, damaged / "model.safetensors")
    for load in _loaders(damaged, "someone/damaged").values():
        for kwargs in ({"num_classes": 5}, {}):
            with pytest.raises(RuntimeError, match=r"missing \['stages.0.3.conv.weight'\]"):
                load(**kwargs)
    complete = _saved_folder(tmp_path / "complete", model)
    ref = model.state_dict()
    for path, load in _loaders(complete, "someone/complete").items():
        tuned = load(num_classes=5).state_dict()
        assert tuned["fc.weight"].shape == (5, 64), path
        assert all(torch.equal(tuned[k], ref[k]) for k in ref if not k.startswith("fc.")), path
    # a 100-class file through the overlay of the default (10-class) cfg keeps its trained classifier
    wide = timm.create_model(MODEL, num_classes=100)
    _saved_folder(tmp_path / "wide", wide)
    loaded = _loaders(tmp_path / "wide", "someone/wide")["overlay"](num_classes=100).state_dict()
    assert torch.equal(loaded["fc.weight"], wide.state_dict()["fc.weight"])


def test_config_num_classes_must_agree_with_its_model_args(tmp_path: Path) -> None:
    """A config.json whose top-level ``num_classes`` disagrees with its ``model_args`` is refused (timm would
    drop the trained classifier); agreeing ones load the classifier."""
    model = timm.create_model(MODEL).eval()
    for i, top in enumerate((5, 100)):
        folder = _saved_folder(tmp_path / f"f{i}", model, model_args={"num_classes": 10})
        config = json.loads((folder / "config.json").read_text())
        write_json(folder / "config.json", {**config, "num_classes": top})
        for path, load in _loaders(folder, f"someone/classes{i}").items():
            if path == "overlay":  # the file's config.json is not read
                continue
            with pytest.raises(ValueError, match=f"num_classes={top}.*num_classes=10"):
                load()
    folder = _saved_folder(tmp_path / "ok", model, model_args={"num_classes": 10})
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_config_state_dict_cannot_replace_the_weights_file(tmp_path: Path) -> None:
    """A config.json carrying ``pretrained_cfg.state_dict`` would make timm load that instead of
    ``model.safetensors`` (never read, never sha-checked): refused on ``local-dir:`` and ``hf-hub:``."""
    folder = _saved_folder(tmp_path / "f", timm.create_model(MODEL))
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["state_dict"] = {"fc.bias": [0.0] * 10}
    write_json(folder / "config.json", config)
    for path, load in _loaders(folder, "someone/state-dict").items():
        if path == "overlay":
            continue
        with pytest.raises(ValueError, match="state_dict"):
            load()


def test_sha256_is_checked_at_the_recorded_commit_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recorded sha256 pins the recorded commit: another commit of the recorded repo (other weights) loads
    unchecked, and the recorded commit's file is checked (a wrong sha256 refuses it)."""
    cache = Path(os.environ["HF_HUB_CACHE"])
    commits = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = _saved_folder(tmp_path / f"w{seed}", timm.create_model(MODEL))
        commits[seed] = fake_commit("sha", str(seed))
        place_in_hf_cache(folder_files(folder), REPO_ID, commits[seed], cache)
    recorded, other = commits[0], commits[1]
    sha = file_sha256(tmp_path / "w0" / "model.safetensors")
    entry = {"hf_hub_id": REPO_ID, "revision": recorded, "sha256": sha, "metrics": {}, "svb_config": None}
    monkeypatch.setitem(pretrained_record.PUBLISHED, NAME, entry)
    for commit, folder in ((recorded, "w0"), (other, "w1")):
        loaded = timm.create_model(f"hf-hub:{REPO_ID}@{commit}", pretrained=True)
        expected = safetensors.torch.load_file(tmp_path / folder / "model.safetensors")
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    monkeypatch.setitem(pretrained_record.PUBLISHED, NAME, {**entry, "sha256": "0" * 64})
    with pytest.raises(PretrainedWeightsIntegrityError, match="0" * 64):
        timm.create_model(f"hf-hub:{REPO_ID}@{recorded}", pretrained=True)
    timm.create_model(f"hf-hub:{REPO_ID}@{other}", pretrained=True)


def run_with_record(script: str, record: Path, cache: Path, tmp_path: Path, *args: str) -> dict[str, Any]:
    """``script ARGS`` in a fresh offline process with the record ``record`` and the Hub cache ``cache``;
    the JSON object its last line prints."""
    env = child_env(
        HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"), TIMM_SVB_PUBLISHED_RECORD=str(record)
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


_LOAD_SCRIPT = """
import json, sys
import safetensors.torch, timm, torch
import timm_svb

name, run_weights, blob = sys.argv[1:4]
arch, repo = name.split(".")[0], "timm-svb/" + name
revision = timm_svb.models._pretrained.PUBLISHED[name]["revision"]

def via_load_pretrained():
    model = timm.create_model(arch)
    timm.models.load_pretrained(model)
    return model

paths = {
    "tagged": lambda: timm.create_model(name, pretrained=True),
    "default_tag": lambda: timm.create_model(arch, pretrained=True),
    "hf_hub_pinned": lambda: timm.create_model(f"hf-hub:{repo}@{revision}", pretrained=True),
    "hf_hub_main": lambda: timm.create_model(f"hf-hub:{repo}", pretrained=True),
    "load_pretrained": via_load_pretrained,
}
out = {"listed": timm.list_pretrained("*svb*"), "hf_hub_id": timm.get_pretrained_cfg(arch).hf_hub_id}
ref = timm.create_model(arch, num_classes=10).eval()
ref.load_state_dict(safetensors.torch.load_file(run_weights))
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    for key, make in paths.items():
        out[key] = torch.equal(make().eval()(x), ref(x))
    tuned = timm.create_model(name, pretrained=True, num_classes=5)
    sd, ref_sd = tuned.state_dict(), ref.state_dict()
    out["tuned_fc"] = list(tuned.fc.weight.shape)
    out["tuned_backbone_equal"] = all(torch.equal(sd[k], ref_sd[k]) for k in sd if not k.startswith("fc."))
data = bytearray(open(blob, "rb").read())
for damage in ("flip", "truncate"):
    with open(blob, "wb") as f:
        flipped = data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:]
        f.write(data[: len(data) // 2] if damage == "truncate" else flipped)
    for key, make in paths.items():
        try:
            make()
            out[f"{damage}:{key}"] = "loaded"
        except Exception as e:  # anything but the integrity error fails the test, with its message
            out[f"{damage}:{key}"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_pretrained_from_record_on_every_path_with_tamper_checks(
    pushed: dict[str, Any], tiny_run: Path, tmp_path: Path
) -> None:
    """The pushed commit, laid out in a Hub cache: ``create_model`` with and without the tag, ``hf-hub:`` at
    the recorded commit and at main, ``timm.models.load_pretrained(model)`` all load exactly the run's weights
    and all refuse a flipped or truncated file (sha256), in a fresh process with the record."""
    cache = tmp_path / "hf_cache"
    entry = read_record(pushed["record"])[NAME]
    files = pushed["api"].files_at(REPO_ID, entry["revision"])
    repo = place_in_hf_cache(files, REPO_ID, entry["revision"], cache)
    blob = repo / "blobs" / entry["sha256"]
    assert blob.is_file()
    out = run_with_record(
        _LOAD_SCRIPT,
        pushed["record"],
        cache,
        tmp_path,
        NAME,
        str(tiny_run / "model_best.safetensors"),
        str(blob),
    )
    assert out["listed"] == [NAME] and out["hf_hub_id"] == f"{REPO_ID}@{entry['revision']}"
    for key in ("tagged", "default_tag", "hf_hub_pinned", "hf_hub_main", "load_pretrained"):
        assert out[key] is True, key
        for damage in ("flip", "truncate"):
            message = out[f"{damage}:{key}"]
            assert message.startswith("PretrainedWeightsIntegrityError") and entry["sha256"] in message, (
                damage,
                key,
                message,
            )
    assert out["tuned_fc"] == [5, 64] and out["tuned_backbone_equal"]


_SHIPPED_LOAD_SCRIPT = """
import json, sys
import safetensors.torch, timm, torch
import timm_svb

name, run_weights = sys.argv[1:3]
arch = name.split(".")[0]
ref = timm.create_model(arch, num_classes=10).eval()
ref.load_state_dict(safetensors.torch.load_file(run_weights))
x = torch.randn(2, 3, 32, 32)
out = {"listed": timm.list_pretrained("*svb*"), "file": timm.get_pretrained_cfg(name).file}
with torch.no_grad():
    for key, model_name in (("tagged", name), ("default_tag", arch)):
        out[key] = torch.equal(timm.create_model(model_name, pretrained=True).eval()(x), ref(x))
path = timm_svb.models._pretrained.shipped_weights_path(name)
data = bytearray(path.read_bytes())
data[-1] ^= 1
path.write_bytes(bytes(data))
try:
    timm.create_model(name, pretrained=True)
    out["tampered"] = "loaded"
except Exception as e:
    out["tampered"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""


def test_in_package_ships_records_and_loads_offline(tiny_run: Path, tmp_path: Path) -> None:
    """``--in-package``: the checked folder stays (to push later), its weights are shipped beside the record
    and recorded pinned by sha256 without a Hub commit; a fresh offline process with that record loads them
    by name (tagged and default tag), lists them, and refuses the file once a byte of it changed."""
    (tmp_path / "models").mkdir()
    record = empty_record(tmp_path / "models" / "published.json")
    release = tmp_path / "release"
    opts = pub.PublishOptions(repo_id=REPO_ID, in_package=release, record=record)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            mp.delenv(var, raising=False)
        mp.setattr(pub, "get_token", lambda: None)  # no token needed
        summary = pub.publish(tiny_run, opts, evaluator=synthetic_evaluator)
    shipped = tmp_path / "models" / "weights" / f"{NAME}.safetensors"
    entry = read_record(record)[NAME]
    assert summary["package_file"] == str(shipped) and summary["release_folder"] == str(release)
    assert "revision" not in entry and entry["package_file"] == f"weights/{NAME}.safetensors"
    assert entry["sha256"] == file_sha256(shipped) == file_sha256(release / "model.safetensors")
    assert stat.S_IMODE(shipped.stat().st_mode) == 0o644 and {p.name for p in release.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "README.md",
    }
    out = run_with_record(
        _SHIPPED_LOAD_SCRIPT,
        record,
        tmp_path / "empty_cache",
        tmp_path,
        NAME,
        str(tiny_run / "model_best.safetensors"),
    )
    assert out["listed"] == [NAME] and out["file"] == str(shipped)
    assert out["tagged"] is True and out["default_tag"] is True
    assert out["tampered"].startswith("PretrainedWeightsIntegrityError") and "Reinstall" in out["tampered"]
    with pytest.raises(pub.PublishError, match="pass one of them"):
        pub.publish(tiny_run, pub.PublishOptions(repo_id=REPO_ID, in_package=release, dry_run=tmp_path / "d"))


def test_record_entries_name_exactly_one_weights_source() -> None:
    base = {"hf_hub_id": REPO_ID, "sha256": "a" * 64, "metrics": {}, "svb_config": {"epsilon": 0.5}}
    pretrained_record.check_entry(NAME, {**base, "revision": "b" * 40})
    pretrained_record.check_entry(NAME, {**base, "package_file": f"weights/{NAME}.safetensors"})
    for entry, message in (
        (base, "exactly one weights source"),
        ({**base, "revision": "b" * 40, "package_file": f"weights/{NAME}.safetensors"}, "exactly one"),
        ({**base, "package_file": "weights/other.safetensors"}, "package_file must be"),
        ({**base, "package_file": f"../{NAME}.safetensors"}, "package_file must be"),
    ):
        with pytest.raises(pretrained_record.RecordError, match=message):
            pretrained_record.check_entry(NAME, entry)


# ------------------------------------------------------------------------------- the maintainer's steps


@pytest.mark.slow
def test_readme_maintainer_steps_end_to_end(
    digits_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README "For maintainers", against the stand-in with a record of several entries: train (the shared
    digits run), dry run with the recipe's re-evaluation, publish, load back from an empty cache as a user,
    then the release's ``pytest`` of everything that reads the record."""
    run_dir = digits_run.run_dir  # step 3
    cache = tmp_path / "cache"
    record = write_json(
        tmp_path / "published.json",
        publish_fake(["preact_resnet20.cifar10", "convnet20.cifar100"], cache, tmp_path / "w"),
    )
    common = [str(run_dir), "--repo-id", REPO_ID, "--tag", TAG, "--require-eval"]
    common += ["--allow-mismatch", "the digits stand in for CIFAR-10 in this test"]
    out = tmp_path / "check"
    assert pub.main([*common, "--dry-run", str(out)]) == 0  # step 4
    dry = json.loads((out / "config.json").read_text())
    assert dry["architecture"] == MODEL and {p.name for p in out.iterdir()} == EXPECTED_FILES

    api = HubStandIn()
    monkeypatch.setattr(pub, "HfApi", lambda **kw: api)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)  # step 2
    assert pub.main([*common, "--record", str(record)]) == 0  # step 5
    entries = read_record(record)
    assert len(entries) == 3 and entries[NAME]["revision"] == api.head(REPO_ID)
    pushed_files = api.files_at(REPO_ID, api.head(REPO_ID))
    dry_files = folder_files(out)  # the dry run checked the same weights and config; the card adds the record
    assert set(pushed_files) == set(dry_files) | {".gitattributes"}
    assert all(pushed_files[k] == dry_files[k] for k in ("model.safetensors", "config.json", "spectrum.png"))
    assert f"recorded for the timm-svb model zoo as `{NAME}`" in pushed_files["README.md"].decode()
    reevaluated = entries[NAME]["metrics"]["reevaluated"]
    recorded = json.loads((run_dir / "run.json").read_text())["metrics"]["best"]
    assert reevaluated == pytest.approx({k: recorded[k] for k in ("top1_err", "top5_err")}, abs=1e-9)

    place_in_hf_cache(
        api.files_at(REPO_ID, api.head(REPO_ID)), REPO_ID, api.head(REPO_ID), cache
    )  # the download
    env = child_env(
        HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"), TIMM_SVB_PUBLISHED_RECORD=str(record)
    )
    step6 = (
        "import sys, timm, timm_svb, torch, safetensors.torch\n"
        f"print(timm.list_pretrained('*svb*'))\n"
        f"m = timm.create_model({NAME!r}, pretrained=True).eval()\n"
        f"ref = timm.create_model({MODEL!r}).eval()\n"
        f"ref.load_state_dict(safetensors.torch.load_file({str(run_dir / 'model_best.safetensors')!r}))\n"
        "x = torch.randn(2, 3, 32, 32)\n"
        "assert torch.equal(m(x), ref(x))\n"
    )
    done = subprocess.run([sys.executable, "-c", step6], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr  # step 6
    assert NAME in done.stdout
    done = run_record_tests(record, cache, tmp_path)  # step 7
    assert done.returncode == 0 and "passed" in done.stdout and "skipped" not in done.stdout, done.stdout[
        -3000:
    ]
