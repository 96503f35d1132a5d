"""Loading pretrained weights (timm_svb.models._pretrained), offline through local folders and a
temporary Hugging Face cache: ``local-dir:``, ``hf-hub:`` and file overlays never unpickle, config files
cannot control loading, loading is strict but for the classifier, sha256 pinned at the recorded commit,
record entries naming one weights source."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import timm
import torch
from hub_helpers import (
    MODEL,
    NAME,
    REPO_ID,
    _offline,  # noqa: F401  (autouse fixture)
    fake_commit,
    folder_files,
    place_in_hf_cache,
    write_json,
)
from huggingface_hub.errors import EntryNotFoundError
from recipe_helpers import one_thread  # noqa: F401  (autouse fixture)
from torch import nn

import timm_svb  # noqa: F401  (registers the zoo)
from timm_svb.hub.record import file_sha256
from timm_svb.models import _pretrained as pretrained_record
from timm_svb.models._pretrained import PretrainedWeightsFormatError, PretrainedWeightsIntegrityError


class _Trap:
    """Unpickling it writes a flag file (stands for arbitrary code in a malicious pickle)."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.flag, "unpickled"))


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
