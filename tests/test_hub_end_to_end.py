"""Publishing end to end, offline: the command line, a push to the in-memory stand-in for ``HfApi`` read
back, ``pretrained=True`` from the record in a fresh process on every loading path with tamper checks,
weights shipped in the package, and the README's maintainer steps on the shared digits run."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hub_helpers import (
    EXPECTED_FILES,
    FAKE_TOKEN,
    MODEL,
    NAME,
    REPO_ID,
    REPO_ROOT,
    TAG,
    HubStandIn,
    _offline,  # noqa: F401  (autouse fixture)
    child_env,
    empty_record,
    folder_files,
    offline_hf,
    place_in_hf_cache,
    publish_fake,
    push,
    run_record_tests,
    synthetic_evaluator,
    write_json,
)
from recipe_helpers import one_thread  # noqa: F401  (autouse fixture)

import timm_svb  # noqa: F401  (registers the zoo)
from timm_svb.hub import publish as pub
from timm_svb.hub.record import file_sha256, read_record

# end-to-end runs: publishing, child processes, the shared digits run
pytestmark = pytest.mark.slow


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
