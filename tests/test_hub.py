"""Publishing weights (hub/publish.py), fully offline: dry run, load back, push to a recording stand-in for
``HfApi``, ``pretrained=True`` from the record through a temporary Hugging Face cache, sha256 verification
and fine-tuning."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard
from torch import nn

import timm_svb  # noqa: F401  (registers the zoo)

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from hub import publish as pub  # noqa: E402
from hub.record import file_sha256  # noqa: E402

MODEL = "convnet20_svb"
TAG = "cifar10"
REPO_ID = f"timm-svb/{MODEL}.{TAG}-test"
FAKE_TOKEN = "hf_FAKEtokenFORtests0123456789abcdefXYZ"
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _spectrum_plot_available() -> bool:
    """Whether publishing plots the spectrum (``timm_svb.spectrum`` and matplotlib importable)."""
    return all(importlib.util.find_spec(m) is not None for m in ("timm_svb.spectrum", "matplotlib"))


SPECTRUM = _spectrum_plot_available()
EXPECTED_FILES = {"README.md", "config.json", "model.safetensors"} | ({"spectrum.png"} if SPECTRUM else set())


# --------------------------------------------------------------------------------------------- fixtures


@contextlib.contextmanager
def offline_hf(root: Path):
    """Offline Hugging Face settings with temporary caches and no token (env and constants)."""
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (("HF_HOME", "home"), ("HF_HUB_CACHE", "hub"), ("HF_TOKEN_PATH", "home/token")):
            mp.setenv(var, str(root / sub))
        mp.setenv("HF_HUB_OFFLINE", "1")
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            mp.delenv(var, raising=False)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "hub"))
        mp.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(root / "home/token"))
        yield mp


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a loaded 2-core machine more threads spin and make small QRs ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment of a child python: offline, one thread."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


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


def make_run(run_dir: Path) -> Path:
    """A tiny run folder as recipes/train.py writes it; its metrics are measured on the synthetic split."""
    run_dir.mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=10)
    with torch.no_grad():  # move away from the init so that a wrong load would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    safetensors.torch.save_file(model.state_dict(), run_dir / "model_best.safetensors")
    safetensors.torch.save_file(model.state_dict(), run_dir / "model_final.safetensors")
    metrics = {"epoch": 3, **synthetic_evaluator(model, {})}
    run = {
        "model": MODEL,
        "model_kwargs": {"num_classes": 10},
        "num_classes": 10,
        "svb_config": {"epsilon": 0.5, "bbn_epsilon": 1.0},
        "dataset": {
            "name": "uoft-cs/cifar10",
            "test_split": "test",
            "label_names": [f"class{i}" for i in range(10)],
            "num_test_images": 48,
        },
        "recipe": {"epochs": 4, "lr": 0.1, "batch_size": 16},
        "metrics": {"best": metrics, "final": metrics},
        "pretrained_cfg": timm.data.resolve_model_data_config(model),
        "timm_svb_version": timm_svb.__version__,
    }
    (run_dir / "run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
    return run_dir


def run_model(run_dir: Path) -> nn.Module:
    """The run's model with its best weights."""
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    return pub.load_run_model(run, run_dir / "model_best.safetensors")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "tiny")


class CommitInfoStandIn:
    """What ``HfApi.upload_folder`` returns, as far as the publisher reads it."""

    def __init__(self, oid: str) -> None:
        self.oid = oid


class RecordingHfApi:
    """Stand-in for ``huggingface_hub.HfApi``: records every call, sends nothing."""

    instances: list[RecordingHfApi] = []

    def __init__(self, upload_copy: Path, **kwargs: Any) -> None:
        self.init_kwargs = kwargs
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.upload_copy = upload_copy
        RecordingHfApi.instances.append(self)

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs: Any) -> CommitInfoStandIn:
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", {"repo_id": repo_id, "files": files, **kwargs}))
        shutil.copytree(folder_path, self.upload_copy)
        return CommitInfoStandIn(FAKE_COMMIT)


def place_in_hf_cache(folder: Path, repo_id: str, revision: str, cache: Path) -> Path:
    """Lay ``folder`` out in ``cache`` exactly as ``hf_hub_download`` does: blobs named by their etag (sha256
    for LFS files such as weights, git blob sha1 otherwise), snapshot symlinks, ``refs/main``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for f in folder.iterdir():
        data = f.read_bytes()
        if f.suffix == ".safetensors":
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        shutil.copyfile(f, repo / "blobs" / etag)
        (repo / "snapshots" / revision / f.name).symlink_to(Path("../../blobs") / etag)
    return repo


@pytest.fixture(scope="module")
def pushed(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Publish the tiny run to the recording stand-in with a fake token; capture every output."""
    root = tmp_path_factory.mktemp("pushed")
    record = root / "published.json"
    record.write_text("{}\n")
    upload_copy = root / "uploaded"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    RecordingHfApi.instances.clear()
    try:
        with (
            offline_hf(root / "hf") as mp,
            contextlib.redirect_stdout(stream),
            contextlib.redirect_stderr(stream),
        ):
            mp.setenv("HF_TOKEN", FAKE_TOKEN)
            opts = pub.PublishOptions(repo_id=REPO_ID, record=record)
            summary = pub.publish(
                tiny_run,
                opts,
                evaluator=synthetic_evaluator,
                api_factory=lambda **kw: RecordingHfApi(upload_copy, **kw),
            )
            print(json.dumps(summary))
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(old_level)
    return {
        "summary": summary,
        "record": record,
        "uploaded": upload_copy,
        "output": stream.getvalue(),
        "apis": list(RecordingHfApi.instances),
    }


# ------------------------------------------------------------------------------------------------ tests


def test_help_documents_dry_run() -> None:
    text = pub.build_parser().format_help()
    for option in ("--dry-run", "OUT_DIR", "--repo-id", "--tolerance", "--require-eval", "--no-record"):
        assert option in text


def test_dry_run_loads_back_identically(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = pub.publish(
        tiny_run, pub.PublishOptions(repo_id=REPO_ID, dry_run=out), evaluator=synthetic_evaluator
    )
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES == set(summary["files"])
    assert summary["recordable"] and summary["record_name"] == f"{MODEL}.{TAG}"
    assert summary["sha256"] == file_sha256(out / "model.safetensors")

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), run_model(tiny_run)(x))

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == MODEL and config["num_classes"] == 10
    assert config["label_names"] == [f"class{i}" for i in range(10)]
    assert config["svb_config"] == {"epsilon": 0.5, "bbn_epsilon": 1.0}
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["tag"] == TAG
    assert cfg["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert not {"file", "hf_hub_id", "url", "source"} & cfg.keys()

    card = ModelCard.load(out / "README.md")
    results = {r.metric_type: r for r in card.data.eval_results}
    recorded = json.loads((tiny_run / "run.json").read_text())["metrics"]["best"]
    assert results["top1_err"].metric_value == pytest.approx(recorded["top1_err"])
    assert results["top5_err"].metric_value == pytest.approx(recorded["top5_err"])
    assert results["top1_err"].dataset_name == "uoft-cs/cifar10"
    assert results["top1_err"].dataset_split == "test"
    for text in (
        "@inproceedings{jia2017improving",
        "num_classes=5",
        '"lr": 0.1',
        "re-evaluation",
        "bbn_epsilon",
    ):
        assert text in card.content
    assert ("![Singular values of every weight layer](spectrum.png)" in card.content) == SPECTRUM


def test_cli_dry_run_without_test_data(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = subprocess_env()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "hub" / "publish.py"),
            str(tiny_run),
            "--repo-id",
            REPO_ID,
            "--dry-run",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["dry_run"] == str(out) and summary["metrics"]["reevaluated"] is None
    assert "not re-evaluated" in proc.stderr
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES


def test_refuses_metrics_beyond_tolerance(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    run["metrics"]["best"]["top1_err"] += 2.0
    (run_dir / "run.json").write_text(json.dumps(run))
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
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    run["pretrained_cfg"]["mean"] = [0.5, 0.5, 0.5]  # preprocessing the zoo cfg cifar10 does not have
    (run_dir / "run.json").write_text(json.dumps(run))
    summary = pub.publish(
        run_dir, pub.PublishOptions(repo_id=REPO_ID, dry_run=tmp_path / "out"), evaluator=synthetic_evaluator
    )
    assert not summary["recordable"] and summary["not_recordable_reason"].startswith("mean:")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]  # the folder keeps the run's own cfg
    summary = pub.publish(
        tiny_run,
        pub.PublishOptions(repo_id=REPO_ID, dry_run=tmp_path / "o2", tag="imagenet"),
        evaluator=synthetic_evaluator,
    )
    assert "no pretrained cfg 'convnet20_svb.imagenet'" in summary["not_recordable_reason"]


def test_refuses_unfinished_runs_and_missing_evaluation(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**run, "status": "stopped"}))
    with pytest.raises(pub.PublishError, match="not finished"):
        pub.publish(run_dir, pub.PublishOptions(repo_id=REPO_ID, dry_run=tmp_path / "o1"))
    with pytest.raises(pub.PublishError, match="require-eval"):
        pub.publish(
            tiny_run,
            pub.PublishOptions(repo_id=REPO_ID, dry_run=tmp_path / "o", require_eval=True),
            evaluator=lambda model, run: None,
        )


def test_check_folder_refuses_differences_and_pickles(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pub.publish(tiny_run, pub.PublishOptions(repo_id=REPO_ID, dry_run=out), evaluator=synthetic_evaluator)
    other = timm.create_model(MODEL, num_classes=10).eval()
    with pytest.raises(pub.PublishError, match="differ"):
        pub.check_folder(out, other)
    torch.save({}, out / "pytorch_model.bin")
    with pytest.raises(pub.PublishError, match="pytorch_model.bin"):
        pub.check_folder(out, run_model(tiny_run))


def test_push_sends_expected_files_and_never_the_token(pushed: dict[str, Any]) -> None:
    (api,) = pushed["apis"]
    assert "token" not in api.init_kwargs  # resolved by huggingface_hub itself (env / login cache)
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    create, upload = (kwargs for _, kwargs in api.calls)
    assert create["repo_id"] == REPO_ID and create["exist_ok"] is True
    assert upload["repo_id"] == REPO_ID
    assert upload["files"] == sorted(EXPECTED_FILES)
    assert upload["commit_message"].startswith(f"Add {MODEL}.{TAG} weights (uoft-cs/cifar10: top-1 err ")
    assert "token" not in upload

    record = json.loads(pushed["record"].read_text())
    assert list(record) == [f"{MODEL}.{TAG}"]
    entry = record[f"{MODEL}.{TAG}"]
    assert entry["hf_hub_id"] == REPO_ID and entry["revision"] == FAKE_COMMIT
    assert entry["sha256"] == file_sha256(pushed["uploaded"] / "model.safetensors")
    assert entry["metrics"]["reevaluated"] is not None
    assert pushed["summary"]["revision"] == FAKE_COMMIT

    assert "pushed" in pushed["output"]  # the capture did see the logs
    assert FAKE_TOKEN not in pushed["output"]
    assert FAKE_TOKEN not in pushed["record"].read_text()
    for f in pushed["uploaded"].iterdir():
        assert FAKE_TOKEN.encode() not in f.read_bytes()


def test_push_needs_a_token_and_a_recordable_target(
    tiny_run: Path, tmp_path: Path, _offline: pytest.MonkeyPatch
) -> None:
    never = RecordingHfApi(tmp_path / "never")
    with pytest.raises(pub.PublishError, match="no Hugging Face token"):
        pub.publish(
            tiny_run,
            pub.PublishOptions(repo_id=REPO_ID),
            evaluator=synthetic_evaluator,
            api_factory=lambda **kw: never,
        )
    _offline.setenv("HF_TOKEN", FAKE_TOKEN)
    with pytest.raises(pub.PublishError, match="not in the 'timm-svb' Hub organisation"):
        pub.publish(
            tiny_run,
            pub.PublishOptions(repo_id="someone/convnet", record=tmp_path / "r.json"),
            evaluator=synthetic_evaluator,
            api_factory=lambda **kw: never,
        )
    assert never.calls == [] and not (tmp_path / "r.json").exists()


_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import safetensors.torch, timm, torch
    import timm_svb
    from timm_svb.models._pretrained import PretrainedWeightsIntegrityError

    name, run_weights, blob = sys.argv[1:4]
    out = {"listed": timm.list_pretrained("*svb*")}
    ref = timm.create_model(name.split(".")[0], num_classes=10).eval()
    ref.load_state_dict(safetensors.torch.load_file(run_weights))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for key, model_name in (("tagged", name), ("default_tag", name.split(".")[0])):
            model = timm.create_model(model_name, pretrained=True).eval()
            out[key] = torch.equal(model(x), ref(x))
        out["hf_hub_id"] = model.pretrained_cfg["hf_hub_id"]
        tuned = timm.create_model(name, pretrained=True, num_classes=5)
        sd, ref_sd = tuned.state_dict(), ref.state_dict()
        out["tuned_fc"] = list(tuned.fc.weight.shape)
        body = [k for k in sd if not k.startswith("fc.")]
        out["tuned_backbone_equal"] = all(torch.equal(sd[k], ref_sd[k]) for k in body)
    for damage in ("flip", "truncate"):
        data = bytearray(open(blob, "rb").read())
        if damage == "flip":
            data[-3] ^= 0xFF
        else:
            data = data[: len(data) // 2]
        with open(blob, "wb") as f:
            f.write(data)
        try:
            timm.create_model(name, pretrained=True)
            out[damage] = "loaded"
        except PretrainedWeightsIntegrityError as e:
            out[damage] = str(e)
    print(json.dumps(out))
    """
)


def test_pretrained_true_from_record_offline(pushed: dict[str, Any], tiny_run: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hf_cache"
    entry = json.loads(pushed["record"].read_text())[f"{MODEL}.{TAG}"]
    repo = place_in_hf_cache(pushed["uploaded"], entry["hf_hub_id"], entry["revision"], cache)
    blob = repo / "blobs" / entry["sha256"]
    assert blob.is_file()
    env = subprocess_env(
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(tmp_path / "home"),
        TIMM_SVB_PUBLISHED_RECORD=str(pushed["record"]),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_SCRIPT,
            f"{MODEL}.{TAG}",
            str(tiny_run / "model_best.safetensors"),
            str(blob),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["listed"] == [f"{MODEL}.{TAG}"]
    assert out["tagged"] and out["default_tag"]
    assert out["hf_hub_id"] == f"{REPO_ID}@{FAKE_COMMIT}"
    assert out["tuned_fc"] == [5, 64] and out["tuned_backbone_equal"]
    for damage in ("flip", "truncate"):
        assert "sha256" in out[damage] and entry["sha256"] in out[damage], out[damage]


@pytest.mark.slow
def test_embedded_default_trains_publishes_and_loads_back(tmp_path: Path) -> None:
    """The one real run possible here: the recipe's embedded default (digits, 1 epoch), a dry run with the
    recipe's own re-evaluation on the test split, and the folder loaded back through timm."""
    train = REPO_ROOT / "recipes" / "train.py"
    if not train.is_file():
        pytest.skip("recipes/train.py is not in this checkout")
    run_dir, out = tmp_path / "digits", tmp_path / "publish"
    proc = subprocess.run(
        [
            sys.executable,
            str(train),
            "--epochs",
            "1",
            "--output",
            str(run_dir),
            "--checkpoint-hist",
            "0",
            "--no-progress",
            "--log-with",
            "none",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    repo_id = "timm-svb/convnet20_svb.sklearn_digits"
    summary = pub.publish(run_dir, pub.PublishOptions(repo_id=repo_id, dry_run=out, require_eval=True))
    recorded = json.loads((run_dir / "run.json").read_text())["metrics"]["best"]
    assert summary["metrics"]["reevaluated"] == pytest.approx(
        {"top1_err": recorded["top1_err"], "top5_err": recorded["top5_err"]}, abs=1e-9
    )
    assert not summary["recordable"] and "sklearn_digits" in summary["not_recordable_reason"]
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), run_model(run_dir)(x))
    card = ModelCard.load(out / "README.md")
    assert {r.dataset_name for r in card.data.eval_results} == {"sklearn-digits"}
