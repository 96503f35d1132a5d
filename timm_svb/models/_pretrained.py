"""Record of published pretrained weights and the pretrained cfgs derived from it.

Only weights listed in ``published.json`` (filled by the hub publisher) get an ``hf_hub_id``, so only
those are announced by ``timm.list_pretrained()``; every other ``model.tag`` cfg carries no weight source.
"""
import json
from collections.abc import Iterable
from importlib import resources
from typing import Any

HUB_ORG = "timm-svb"
PUBLISHED_FILE = "published.json"

# Keys every record entry must carry.
_RECORD_KEYS = ("hf_hub_id", "revision", "sha256", "metrics")


def _load_published() -> dict[str, dict]:
    """Read and validate the record of published weights shipped with the package."""
    record = json.loads(resources.files(__package__).joinpath(PUBLISHED_FILE).read_text(encoding="utf-8"))
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


def hub_cfg(name: str) -> dict[str, Any]:
    """Weight source entries for a published ``model.tag`` (empty if it is not in the record)."""
    entry = PUBLISHED.get(name)
    if entry is None:
        return {}
    revision = entry.get("revision")
    return {"hf_hub_id": f"{entry['hf_hub_id']}@{revision}" if revision else entry["hf_hub_id"]}


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
