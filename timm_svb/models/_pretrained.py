"""Record of published pretrained weights, the pretrained cfgs derived from it, and the one weights loader.

Only weights listed in ``published.json`` (filled by the hub publisher) get a weight source, so only
those are announced by ``timm.list_pretrained()``; every other ``model.tag`` cfg carries none. An entry's
weights are either on the Hugging Face Hub, pinned to a commit (``revision``), or shipped inside the package
(``package_file``, a file beside the record, for weights published where the Hub cannot be reached); both
are pinned by sha256. Every pretrained load of our architectures goes through :func:`load_weights` (timm's
``custom_load`` hook, see :func:`route_weights`): it reads safetensors only, never a pickle, and a recorded
file (a recorded repository at its recorded commit, or a shipped file) must have the recorded sha256.
"""

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

HUB_ORG = "timm-svb"
PUBLISHED_FILE = "published.json"
# The only weights file published and loaded (never a pickle).
WEIGHTS_FILENAME = "model.safetensors"
# Environment variable naming another record file (tests, or a maintainer checking a record before release).
RECORD_ENV = "TIMM_SVB_PUBLISHED_RECORD"

_NAME = re.compile(r"[a-z0-9_]+\.[a-z0-9_]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Keys every record entry carries, and exactly one of the weights' sources: "revision" (the Hub commit) or
# "package_file" (shipped in the package: weights/MODEL.TAG.safetensors beside the record). The optional ones
# are overrides stated on the model card: "svb_override" (why an _svb name holds weights trained without SVB),
# "allow_mismatch" (why the weights are recorded under a tag whose data or schedule the run does not meet).
_RECORD_KEYS = ("hf_hub_id", "sha256", "metrics", "svb_config")
_SOURCE_KEYS = ("revision", "package_file")
_OPTIONAL_KEYS = ("svb_override", "allow_mismatch")
PACKAGE_WEIGHTS_DIR = "weights"


class RecordError(ValueError):
    """A record of published weights (or one of its entries) is malformed."""


def check_entry(name: str, entry: Mapping[str, Any]) -> None:
    """Raise :class:`RecordError` unless ``entry`` is a valid record entry for ``name`` (``model.tag``).

    Valid: the repository is ``timm-svb/<name>``; the weights either on the Hub at ``revision`` (a full 40-hex
    commit id) or shipped in the package as ``package_file`` = ``weights/<name>.safetensors``, not both; the
    sha256 64 hex digits; and an ``_svb`` model carries the SVB settings its weights were trained with (an
    ``svb_config`` with a positive ``epsilon``) unless ``svb_override`` says why not.
    """
    where = f"record entry {name!r}"
    if not _NAME.fullmatch(name):
        raise RecordError(f"{where}: the key must be 'model_name.tag' (lower case, digits, '_')")
    if not isinstance(entry, Mapping):
        raise RecordError(f"{where}: not a JSON object")
    missing = [k for k in _RECORD_KEYS if k not in entry]
    unknown = sorted(set(entry) - set(_RECORD_KEYS) - set(_SOURCE_KEYS) - set(_OPTIONAL_KEYS))
    if missing or unknown:
        raise RecordError(f"{where}: missing keys {missing}, unknown keys {unknown}")
    if entry["hf_hub_id"] != f"{HUB_ORG}/{name}":
        raise RecordError(f"{where}: hf_hub_id must be '{HUB_ORG}/{name}', got {entry['hf_hub_id']!r}")
    sources = [k for k in _SOURCE_KEYS if k in entry]
    if len(sources) != 1:
        raise RecordError(f"{where}: needs exactly one weights source of {list(_SOURCE_KEYS)}, got {sources}")
    shipped = package_file_of(name)
    if "package_file" in entry and entry["package_file"] != shipped:
        raise RecordError(f"{where}: package_file must be {shipped!r}, got {entry['package_file']!r}")
    revision = entry.get("revision", "0" * 40)
    if not isinstance(revision, str) or not _COMMIT.fullmatch(revision):
        raise RecordError(f"{where}: revision must be a full 40-hex commit id, got {revision!r}")
    if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
        raise RecordError(f"{where}: sha256 must be 64 hex digits, got {entry['sha256']!r}")
    if not isinstance(entry["metrics"], Mapping):
        raise RecordError(f"{where}: metrics must be a JSON object")
    allowed = entry.get("allow_mismatch")
    if allowed is not None and not (isinstance(allowed, str) and allowed.strip()):
        raise RecordError(f"{where}: allow_mismatch must state why, got {allowed!r}")
    svb, override = entry["svb_config"], entry.get("svb_override")
    if svb is not None and not isinstance(svb, Mapping):
        raise RecordError(f"{where}: svb_config must be a JSON object or null")
    if name.split(".")[0].endswith("_svb") and not _positive(svb and svb.get("epsilon")):
        if not (isinstance(override, str) and override.strip()):
            raise RecordError(
                f"{where}: an _svb model needs the SVB settings its weights were trained with (svb_config "
                "with a positive epsilon), or an svb_override stating why not (also stated on the model card)"
            )


def package_file_of(name: str) -> str:
    """Where the package ships the weights of record entry ``name``, relative to the record's folder."""
    return f"{PACKAGE_WEIGHTS_DIR}/{name}.safetensors"


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def parse_record(text: str, source: str = PUBLISHED_FILE) -> dict[str, dict]:
    """Parse and validate a record's JSON text; :class:`RecordError` names the problem and ``source``."""
    try:
        record = json.loads(text)
    except ValueError as e:
        raise RecordError(f"{source}: not valid JSON ({e})") from e
    if not isinstance(record, dict):
        raise RecordError(f"{source}: the record must be a JSON object of 'model.tag' entries")
    for name, entry in record.items():
        try:
            check_entry(name, entry)
        except RecordError as e:
            raise RecordError(f"{source}: {e}") from None
    return record


def _record_source() -> Path:
    """The package's record (or the one ``$TIMM_SVB_PUBLISHED_RECORD`` names)."""
    override = os.environ.get(RECORD_ENV)
    return Path(override) if override else Path(str(resources.files(__package__).joinpath(PUBLISHED_FILE)))


def _load_published() -> dict[str, dict]:
    """Read and validate the record (:func:`_record_source`)."""
    source = _record_source()
    return parse_record(source.read_text(encoding="utf-8"), str(source))


RECORD_SOURCE = _record_source()  # shipped weights lie beside it
# "model_name.tag" -> {"hf_hub_id", "revision" | "package_file", "sha256", "metrics", "svb_config"[, ...]}
PUBLISHED: dict[str, dict] = _load_published()


def shipped_weights_path(name: str) -> Path:
    """The file of a record entry shipped in the package (its ``package_file``, beside the record)."""
    return RECORD_SOURCE.parent / PUBLISHED[name]["package_file"]


class PretrainedWeightsNotPublishedError(RuntimeError):
    """Raised for ``pretrained=True`` when the requested weights are not in the published record."""

    def __init__(self, name: str) -> None:
        self.name = name
        published = sorted(k for k in PUBLISHED if k.split(".")[0] == name.split(".")[0])
        super().__init__(
            f"No pretrained weights for '{name}': they are not published in the timm-svb record "
            f"(timm_svb/models/{PUBLISHED_FILE}; published for this model: {published or 'none'}). "
            "To load weights you trained yourself, pass a local file with "
            "`timm.create_model(..., pretrained=True, "
            "pretrained_cfg_overlay=dict(file='path/to/model.safetensors'))` "
            "or load a folder written by `timm.models.save_for_hf` with "
            "`timm.create_model('local-dir:/path/to/folder', pretrained=True)`."
        )


class PretrainedWeightsIntegrityError(RuntimeError):
    """The weights file of a recorded repository and commit does not have the recorded sha256."""


class PretrainedWeightsFormatError(RuntimeError):
    """A pretrained weights file is not safetensors (pickles are never loaded) or does not exist."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_cache_origin(path: Path) -> tuple[str, str] | None:
    """``(repo_id, commit)`` of a file in the Hugging Face cache layout
    (``.../models--ORG--NAME/snapshots/COMMIT/FILE``), None for any other path."""
    snapshot, snapshots, repo = path.parent, path.parent.parent, path.parent.parent.parent
    if snapshots.name != "snapshots" or not repo.name.startswith("models--"):
        return None
    return repo.name[len("models--") :].replace("--", "/"), snapshot.name  # repo names cannot hold "--"


def recorded_name(repo_id: str, commit: str) -> str | None:
    """The record entry that pins ``repo_id`` at ``commit``, if any."""
    for name, entry in PUBLISHED.items():
        if entry["hf_hub_id"] == repo_id and entry.get("revision") == commit:
            return name
    return None


def shipped_name(path: Path) -> str | None:
    """The record entry whose shipped file ``path`` is, if any."""
    resolved = path.resolve()
    for name, entry in PUBLISHED.items():
        if "package_file" in entry and shipped_weights_path(name).resolve() == resolved:
            return name
    return None


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a safetensors weights file, checked against the record when it is a recorded one.

    The bytes are read once, hashed and parsed from memory, so what is checked is what is loaded. A file in
    the Hugging Face cache of a recorded repository at its recorded commit (however it was reached:
    ``create_model`` with or without a tag, ``hf-hub:``, ``timm.models.load_pretrained``) must have the
    recorded sha256 (:class:`PretrainedWeightsIntegrityError` otherwise). Anything but safetensors raises
    :class:`PretrainedWeightsFormatError`: a pickle is never unpickled.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PretrainedWeightsFormatError(
            f"cannot read pretrained weights {path} ({e.strerror}): timm-svb models load {WEIGHTS_FILENAME} "
            "(safetensors) only, never a pickle such as pytorch_model.bin"
        ) from e
    origin = _hub_cache_origin(path)
    name = recorded_name(*origin) if origin else shipped_name(path)
    if name is not None:
        digest, expected = hashlib.sha256(data).hexdigest(), PUBLISHED[name]["sha256"]
        if digest != expected:
            where, fix = (
                (f"{origin[0]}@{origin[1]}", "Delete that file from the Hugging Face cache and retry.")
                if origin
                else (
                    "shipped in the package",
                    "Reinstall timm-svb (pip install --force-reinstall timm-svb).",
                )
            )
            raise PretrainedWeightsIntegrityError(
                f"Pretrained weights of '{name}' ({where}) are corrupt or tampered with: sha256 of {path} is "
                f"{digest}, the timm-svb record says {expected}. Nothing was loaded. {fix}"
            )
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own SafetensorError (and others) for foreign bytes
        raise PretrainedWeightsFormatError(
            f"{path} is not a safetensors file ({type(e).__name__}: {e}); timm-svb models never unpickle "
            "weights: convert them with safetensors.torch.save_file(state_dict, 'model.safetensors')"
        ) from e


def route_weights(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A pretrained cfg whose weight source timm loads through the model's ``load_pretrained`` (and so
    :func:`load_weights`), on every path.

    timm calls ``model.load_pretrained(file)`` for a ``custom_load`` cfg: with ``custom_load='hf'`` for
    Hub sources (downloading ``hf_hub_filename``, here always ``model.safetensors``, never the
    ``pytorch_model.bin`` timm would try first), and for files and URLs. A ``local-dir:`` folder becomes its
    ``model.safetensors`` file, where timm would fall back to a pickle in the folder. A ``config.json``
    (``local-dir:``, ``hf-hub:``) that carries a ``state_dict`` is refused (``ValueError``).
    """
    cfg = dict(cfg)
    if cfg.get("source") in ("local-dir", "hf-hub") and cfg.get("state_dict") is not None:
        # timm would load this dict instead of the folder's weights file: never read, never sha-checked
        raise ValueError(
            f"config.json of {cfg.get('architecture')} sets pretrained_cfg.state_dict: the weights come from "
            f"{WEIGHTS_FILENAME} only; remove state_dict from the file"
        )
    if cfg.get("source") == "local-dir":
        cfg.update(source=None, file=str(Path(cfg["file"]) / WEIGHTS_FILENAME))
    if cfg.get("hf_hub_id"):
        cfg["hf_hub_filename"] = WEIGHTS_FILENAME
    cfg["custom_load"] = "hf"
    return cfg


def hub_cfg(name: str) -> dict[str, Any]:
    """Weight source entries for a published ``model.tag`` (empty if it is not in the record): its Hub
    repository at the recorded commit, or the file shipped in the package."""
    entry = PUBLISHED.get(name)
    if entry is None:
        return {}
    if "package_file" in entry:
        return route_weights({"file": str(shipped_weights_path(name))})
    return route_weights({"hf_hub_id": f"{entry['hf_hub_id']}@{entry['revision']}"})


def pretrained_cfgs(
    model_names: Iterable[str],
    tag_cfgs: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Build ``generate_default_cfgs`` input: one ``model.tag`` cfg per model and data set tag.

    The first tag of ``tag_cfgs`` is the default whatever is published: it comes last with a ``*``, which
    makes timm put it first even after a tag with weights (that timm would otherwise make the default). Only
    published tags get a weight source.
    """
    default, *others = tag_cfgs
    return {
        f"{model}.{tag}{'*' if tag == default else ''}": {**tag_cfgs[tag], **hub_cfg(f"{model}.{tag}")}
        for model in model_names
        for tag in (*others, default)
    }
