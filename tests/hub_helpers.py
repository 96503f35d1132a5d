"""Shared helpers of the hub and model-zoo tests: an offline Hugging Face setup, a Hub cache laid out as
``hf_hub_download`` leaves it, valid records of published weights with their files in such a cache, a
stand-in for ``HfApi`` that keeps repositories in memory and runs ``huggingface_hub``'s own
``upload_folder``, and the record-dependent tests run against any record; for the publisher's tests
(tests/test_hub_*.py, tests/test_pretrained.py), tiny run folders, a synthetic evaluator and a push to the
stand-in (the shared ``tiny_run`` fixture is in conftest.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import httpx2
import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
from huggingface_hub import hf_api as hf_api_module
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from torch import nn

import timm_svb  # noqa: F401  (registers the zoo)

REPO_ROOT = Path(__file__).resolve().parents[1]
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


@contextlib.contextmanager
def offline_hf(root: Path) -> Iterator[pytest.MonkeyPatch]:
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


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child python: offline, one thread, no token, this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath, **extra}


def place_in_hf_cache(files: dict[str, bytes], repo_id: str, revision: str, cache: Path) -> Path:
    """Lay ``files`` out in ``cache`` exactly as ``hf_hub_download`` does: blobs named by their etag (sha256
    for LFS files such as weights, git blob sha1 otherwise), snapshot symlinks, ``refs/main``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for name, data in files.items():
        if name.endswith(".safetensors"):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / etag).write_bytes(data)
        (repo / "snapshots" / revision / name).symlink_to(Path("../../blobs") / etag)
    return repo


def folder_files(folder: Path) -> dict[str, bytes]:
    """The files of a folder, by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def fake_commit(*parts: str) -> str:
    """A stable 40-hex commit id."""
    return hashlib.sha1("/".join(parts).encode()).hexdigest()


def publish_fake(names: Iterable[str], cache: Path, work: Path) -> dict[str, dict]:
    """Valid record entries for ``names`` (``model.tag``), their weights (random, seeded) saved with timm's
    ``save_for_hf`` and laid out in the Hub cache ``cache`` at a fake pinned commit, as if published."""
    record = {}
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        model = timm.create_model(name)
        folder = work / name
        timm.models.save_for_hf(model, str(folder), safe_serialization=True)
        repo_id, revision = f"timm-svb/{name}", fake_commit(name)
        place_in_hf_cache(folder_files(folder), repo_id, revision, cache)
        record[name] = {
            "hf_hub_id": repo_id,
            "revision": revision,
            "sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest(),
            "metrics": {"top1_err": 50.0, "top5_err": 10.0},
            "svb_config": getattr(model, "svb_config", None),
        }
    return record


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


class HubStandIn(HfApi):
    """``HfApi`` whose wire is replaced by repositories in memory: ``upload_folder`` is huggingface_hub's own
    (argument checks, additions, ``delete_patterns`` deletions, card YAML check), ending in a fake
    ``create_commit`` that applies the operations, honours ``parent_commit`` and skips unchanged commits.
    Every call is recorded; ``before_commit`` may change the repo first (a racing push)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.init_kwargs = kwargs
        self.repos: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.before_commit: Callable[[HubStandIn, str], None] | None = None

    # -- repositories: {"private": bool, "commits": [(sha, {path: bytes})]}
    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        self.repos[repo_id] = {"private": private, "commits": []}
        return self.push(repo_id, {".gitattributes": GITATTRIBUTES, **files})

    def push(self, repo_id: str, files: dict[str, bytes]) -> str:
        commits = self.repos[repo_id]["commits"]
        parent = commits[-1][0] if commits else ""
        sha = fake_commit(
            repo_id, parent, *(f"{k}:{hashlib.sha256(v).hexdigest()}" for k, v in files.items())
        )
        commits.append((sha, dict(files)))
        return sha

    def files_at(self, repo_id: str, revision: str) -> dict[str, bytes]:
        return next(files for sha, files in self.repos[repo_id]["commits"] if sha == revision)

    def head(self, repo_id: str) -> str:
        return self.repos[repo_id]["commits"][-1][0]

    def _not_found(self, repo_id: str) -> RepositoryNotFoundError:
        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        return RepositoryNotFoundError(f"{repo_id} not found", response=httpx2.Response(404, request=request))

    # -- the HfApi methods the publisher and upload_folder call
    def repo_info(self, repo_id: str, **kwargs: Any) -> SimpleNamespace:
        self.calls.append(("repo_info", {"repo_id": repo_id, **kwargs}))
        if repo_id not in self.repos:
            raise self._not_found(repo_id)
        return SimpleNamespace(id=repo_id, sha=self.head(repo_id), private=self.repos[repo_id]["private"])

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if repo_id not in self.repos:
            self.add_repo(repo_id, {}, private=bool(kwargs.get("private")))
        return f"https://huggingface.co/{repo_id}"

    def list_repo_files(self, repo_id: str, **kwargs: Any) -> list[str]:
        return sorted(self.files_at(repo_id, self.head(repo_id)))

    def _validate_yaml(self, content: str, **kwargs: Any) -> None:
        self.calls.append(("validate_yaml", {}))
        ModelCard(content)  # the card's metadata must parse

    def upload_folder(self, **kwargs: Any) -> CommitInfo:
        self.calls.append(("upload_folder", kwargs))
        with mock.patch.object(hf_api_module, "is_xet_available", lambda: False):  # the one-commit path
            return super().upload_folder(**kwargs)

    def create_commit(self, repo_id: str, operations: list[Any], **kwargs: Any) -> CommitInfo:
        self.calls.append(("create_commit", {"repo_id": repo_id, "operations": operations, **kwargs}))
        if self.before_commit is not None:
            self.before_commit(self, repo_id)
        parent = kwargs.get("parent_commit")
        if parent is not None and parent != self.head(repo_id):
            request = httpx2.Request("POST", f"https://huggingface.co/api/models/{repo_id}/commit/main")
            response = httpx2.Response(412, request=request)
            raise HfHubHTTPError(f"412: {parent} is not the head of {repo_id}", response=response)
        files = dict(self.files_at(repo_id, self.head(repo_id)))
        for op in operations:
            if isinstance(op, CommitOperationDelete):
                del files[op.path_in_repo]
            elif isinstance(op, CommitOperationAdd):
                src = op.path_or_fileobj
                files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
        if files != self.files_at(repo_id, self.head(repo_id)):
            self.push(repo_id, files)
        sha = self.head(repo_id)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{sha}",
            commit_message=kwargs.get("commit_message", ""),
            commit_description="",
            oid=sha,
        )


def run_record_tests(record: Path, cache: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """``pytest -m record tests/test_models.py`` with ``record`` as the package's record and ``cache`` as the
    Hub cache, in a fresh process whose every socket connection fails: the tests must hold for any valid
    record, and never reach the network (offline by construction, HF_HUB_OFFLINE unset)."""
    env = child_env(
        HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"), TIMM_SVB_PUBLISHED_RECORD=str(record)
    )
    del env["HF_HUB_OFFLINE"]
    tests = str(REPO_ROOT / "tests" / "test_models.py")
    script = (
        "import socket, sys\n"
        "def _blocked(self, *args, **kwargs):\n"
        "    raise RuntimeError(f'network access from a test: {args}')\n"
        "socket.socket.connect = socket.socket.connect_ex = socket.getaddrinfo = _blocked\n"
        "import pytest\n"
        f"sys.exit(pytest.main(['-q', '-m', 'record', '-p', 'no:cacheprovider', {tests!r}]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )


# ---------------------------------------------------------------- the publisher's tests (test_hub_*.py)

MODEL = "convnet20_svb"
TAG = "cifar10"
NAME = f"{MODEL}.{TAG}"
REPO_ID = f"timm-svb/{NAME}"
FAKE_TOKEN = "hf_FAKEtokenFORtests0123456789abcdefXYZ"
EXPECTED_FILES = {"README.md", "config.json", "model.safetensors", "spectrum.png"}


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path):
    """Offline Hugging Face settings in every test of a module that imports this fixture (autouse)."""
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


def empty_record(path: Path) -> Path:
    """A record file ``{}`` with the usual mode of a checked-out file."""
    write_json(path, {})
    os.chmod(path, 0o644)
    return path


def push(run_dir: Path, api: HubStandIn, evaluator: Any = synthetic_evaluator, **opts: Any) -> dict[str, Any]:
    """``publish`` to the stand-in with a fake token."""
    # imported here: test_models.py's record tests import this module, and not the publisher
    from timm_svb.hub import publish as pub

    opts = {"repo_id": REPO_ID, **opts}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", FAKE_TOKEN)
        return pub.publish(
            run_dir,
            pub.PublishOptions(**opts),
            evaluator=evaluator,
            api_factory=lambda **kw: (api.init_kwargs.update(kw), api)[1],
        )
