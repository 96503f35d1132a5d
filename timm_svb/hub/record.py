"""The package's record of published weights (``timm_svb/models/published.json``): where it is, its entries,
and writing them.

An entry ``"model_name.tag": {"hf_hub_id", "revision", "sha256", "metrics", "svb_config"}`` pins the Hub
commit that holds the weights and the sha256 of its ``model.safetensors``; an entry with ``"package_file"``
instead of ``"revision"`` pins a weights file shipped inside the package (``weights/MODEL.TAG.safetensors``
beside the record: published where the Hub cannot be reached, until a push moves the entry to the Hub
commit). The zoo derives its pretrained cfgs from the record. Entries are validated on read and on write
(``timm_svb.models._pretrained.check_entry``).

Where the record is written (one rule): ``--record PATH`` when given; otherwise the ``published.json`` of the
``timm_svb`` that is imported (the one that checked the weights), and only when that ``timm_svb`` is a
source checkout (an editable install or ``PYTHONPATH``). A record inside an installed package
(``site-packages``) is never written: it would be lost with the next install and ship nowhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock

import timm_svb.models
from timm_svb.models._pretrained import (
    HUB_ORG,
    WEIGHTS_FILENAME,
    RecordError,
    check_entry,
    file_sha256,
    package_file_of,
    parse_record,
)

__all__ = [
    "WEIGHTS_FILENAME",
    "RecordError",
    "default_record_path",
    "file_sha256",
    "read_record",
    "record_entry",
    "record_path",
    "ship_weights",
    "write_record",
]

_INSTALLED = ("site-packages", "dist-packages")


def default_record_path() -> Path:
    """The record of the imported ``timm_svb`` (in the source tree for an editable install)."""
    return Path(timm_svb.models.__file__).resolve().parent / "published.json"


def record_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The record to write (see the module docstring); :class:`RecordError` when the rule forbids it."""
    path = Path(explicit).resolve() if explicit is not None else default_record_path()
    if any(part in _INSTALLED for part in path.parts):
        raise RecordError(
            f"{path} is inside an installed package: the record must be written into a source checkout "
            "(pip install -e . from it, or pass --record path/to/checkout/timm_svb/models/published.json)"
        )
    if explicit is None and not (path.parents[2] / "pyproject.toml").is_file():
        raise RecordError(f"{path} is not in a source checkout of timm-svb: pass --record PATH")
    return path


def read_record(path: str | os.PathLike[str], writable: bool = False) -> dict[str, dict]:
    """Parse and validate the record at ``path``; with ``writable``, also check that it can be replaced."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecordError(f"cannot read the record {path}: {e.strerror}") from e
    record = parse_record(text, str(path))
    if writable and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
        raise RecordError(f"the record {path} (or its folder) is not writable")
    return record


def record_entry(
    folder: str | os.PathLike[str],
    name: str,
    revision: str | None,
    metrics: dict[str, Any],
    svb_config: dict[str, Any] | None,
    svb_override: str | None = None,
    allow_mismatch: str | None = None,
) -> dict[str, Any]:
    """The (validated) record entry ``name`` of a published folder: repo id, pinned commit (None: the weights
    are shipped in the package, :func:`ship_weights`), sha256 of its weights, metrics and the SVB settings the
    weights were trained with; the stated overrides, if any."""
    entry = {
        "hf_hub_id": f"{HUB_ORG}/{name}",
        **({"revision": revision} if revision is not None else {"package_file": package_file_of(name)}),
        "sha256": file_sha256(Path(folder) / WEIGHTS_FILENAME),
        "metrics": metrics,
        "svb_config": svb_config,
        **({"svb_override": svb_override} if svb_override else {}),
        **({"allow_mismatch": allow_mismatch} if allow_mismatch else {}),
    }
    check_entry(name, entry)
    return entry


def ship_weights(folder: str | os.PathLike[str], record: str | os.PathLike[str], name: str) -> Path:
    """Copy a checked folder's weights into the package beside ``record`` (``weights/NAME.safetensors``, mode
    0644), atomically; returns the file. The record entry (``record_entry(..., revision=None)``) pins its
    sha256."""
    target = Path(record).parent / package_file_of(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    _replace_atomically(target, (Path(folder) / WEIGHTS_FILENAME).read_bytes(), 0o644)
    return target


def write_record(path: str | os.PathLike[str], name: str, entry: dict[str, Any]) -> None:
    """Add (or replace) ``name`` in the record at ``path``: validated, under a lock (concurrent writers keep
    each other's entries), atomically, keys sorted, the file's mode kept."""
    check_entry(name, entry)
    path = Path(path)
    with FileLock(_lock_file(path)):
        record = read_record(path)
        record[name] = entry
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        _replace_atomically(path, text.encode("utf-8"), path.stat().st_mode & 0o7777)


def _replace_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` through a temporary file beside it and a rename: a reader sees
    the old file or the whole new one (mkstemp makes 0600: others could not import it, hence ``mode``)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _lock_file(path: Path) -> Path:
    """A lock file for ``path`` in the temporary folder (not beside the record, in the checkout)."""
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"timm-svb-record-{key}.lock"
