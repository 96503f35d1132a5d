"""The package's record of published weights (``timm_svb/models/published.json``): entries and writing.

An entry ``"model_name.tag": {"hf_hub_id", "revision", "sha256", "metrics"}`` pins the Hub commit that holds
the weights and the sha256 of its ``model.safetensors``; the zoo derives its pretrained cfgs from it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from timm_svb.models._pretrained import WEIGHTS_FILENAME, file_sha256

__all__ = ["WEIGHTS_FILENAME", "default_record_path", "file_sha256", "record_entry", "write_record"]

_COMMIT = re.compile(r"[0-9a-f]{40}")


def default_record_path() -> Path:
    """The record shipped with the package (in the source tree for an editable install)."""
    import timm_svb.models

    return Path(timm_svb.models.__file__).resolve().parent / "published.json"


def record_entry(
    folder: str | os.PathLike[str], repo_id: str, revision: str, metrics: dict[str, Any]
) -> dict:
    """The record entry of a published folder: repo id, pinned commit, sha256 of its weights, metrics."""
    if not _COMMIT.fullmatch(revision):
        raise ValueError(f"revision must be a full 40-hex commit id, got {revision!r}")
    return {
        "hf_hub_id": repo_id,
        "revision": revision,
        "sha256": file_sha256(Path(folder) / WEIGHTS_FILENAME),
        "metrics": metrics,
    }


def write_record(path: str | os.PathLike[str], name: str, entry: dict[str, Any]) -> None:
    """Add (or replace) ``name`` in the record at ``path``, atomically, keys sorted."""
    path = Path(path)
    record = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    record[name] = entry
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".published-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
