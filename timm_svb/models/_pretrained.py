"""Record of published pretrained weights and the pretrained cfgs derived from it.

Only weights listed in ``published.json`` (filled by the hub publisher) get an ``hf_hub_id``, so only
those are announced by ``timm.list_pretrained()``; every other ``model.tag`` cfg carries no weight source.
"""

import hashlib
import json
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from timm.models import resolve_pretrained_cfg

HUB_ORG = "timm-svb"
PUBLISHED_FILE = "published.json"
# The only weights file published and loaded (never a pickle).
WEIGHTS_FILENAME = "model.safetensors"
# Environment variable naming another record file (tests, or a maintainer checking a record before release).
RECORD_ENV = "TIMM_SVB_PUBLISHED_RECORD"

# Keys every record entry must carry.
_RECORD_KEYS = ("hf_hub_id", "revision", "sha256", "metrics")


def _load_published() -> dict[str, dict]:
    """Read and validate the record of published weights shipped with the package."""
    override = os.environ.get(RECORD_ENV)
    source = Path(override) if override else resources.files(__package__).joinpath(PUBLISHED_FILE)
    record = json.loads(source.read_text(encoding="utf-8"))
    for name, entry in record.items():
        if "." not in name:
            raise ValueError(f"{PUBLISHED_FILE}: key {name!r} is not of the form 'model_name.tag'")
        missing = [k for k in _RECORD_KEYS if k not in entry]
        if missing:
            raise ValueError(f"{PUBLISHED_FILE}: entry {name!r} lacks {missing}")
        if not entry["hf_hub_id"].startswith(f"{HUB_ORG}/"):
            raise ValueError(f"{PUBLISHED_FILE}: entry {name!r} is not in the {HUB_ORG!r} Hub organisation")
    return record


# "model_name.tag" -> {"hf_hub_id": ..., "revision": ..., "sha256": ..., "metrics": {...}}
PUBLISHED: dict[str, dict] = _load_published()


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
    """The downloaded weights of a published record entry do not have the recorded sha256."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified_weights_file(name: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Download (or find in the Hugging Face cache) the weights of record entry ``name`` at its pinned
    revision and check their sha256; raise :class:`PretrainedWeightsIntegrityError` on a mismatch."""
    from huggingface_hub import hf_hub_download

    entry = PUBLISHED[name]
    path = hf_hub_download(
        entry["hf_hub_id"], WEIGHTS_FILENAME, revision=entry["revision"], cache_dir=cache_dir
    )
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise PretrainedWeightsIntegrityError(
            f"Pretrained weights of '{name}' ({entry['hf_hub_id']}@{entry['revision']}) are corrupt or "
            f"tampered with: sha256 of {path} is {digest}, the timm-svb record says {entry['sha256']}. "
            "Nothing was loaded. Delete that file from the Hugging Face cache and retry."
        )
    return path


def with_verified_weights(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``create_model`` kwargs that load record weights from their sha256-verified file.

    When ``pretrained=True`` resolves to a published record entry (and no other weight source is given),
    the weights file is downloaded and verified first and handed to timm as ``pretrained_cfg_overlay['file']``
    (a safetensors file, loaded without pickle); any other weight source passes through unchanged.
    """
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay).to_dict()
    name = f"{variant}.{cfg.get('tag')}"
    if name not in PUBLISHED or cfg.get("hf_hub_id") != hub_cfg(name)["hf_hub_id"]:
        return kwargs
    if any(cfg.get(k) for k in ("source", "file", "state_dict")):
        return kwargs
    overlay["file"] = verified_weights_file(name, kwargs.get("cache_dir"))
    return {**kwargs, "pretrained_cfg_overlay": overlay}


def hub_cfg(name: str) -> dict[str, Any]:
    """Weight source entries for a published ``model.tag`` (empty if it is not in the record)."""
    entry = PUBLISHED.get(name)
    if entry is None:
        return {}
    revision = entry.get("revision")
    hf_hub_id = f"{entry['hf_hub_id']}@{revision}" if revision else entry["hf_hub_id"]
    return {"hf_hub_id": hf_hub_id, "hf_hub_filename": WEIGHTS_FILENAME}


def pretrained_cfgs(
    model_names: Iterable[str],
    tag_cfgs: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Build ``generate_default_cfgs`` input: one ``model.tag`` cfg per model and data set tag.

    The first tag of ``tag_cfgs`` is the default unless another tag of the model is published
    (timm prefers tags with weights). Only published tags get a weight source.
    """
    return {
        f"{model}.{tag}": {**cfg, **hub_cfg(f"{model}.{tag}")}
        for model in model_names
        for tag, cfg in tag_cfgs.items()
    }
