"""Model zoo tests (timm-style, CPU): registration, timm behaviour, paper sizes, SVB init/bounds, weights.

Tests marked ``record`` read the package's record of published weights: they hold for any valid record
(``test_record_dependent_tests_hold_for_records_of`` runs them with records of 0, 1 and 3 entries) and never
reach the network."""

import copy
import functools
import json
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from hub_helpers import publish_fake, run_record_tests, write_json
from PIL import Image
from timm.data import resolve_data_config
from timm.models import group_parameters
from torch import nn

import timm_svb  # noqa: F401  (registers the models)
from timm_svb import SVB
from timm_svb.models import _pretrained
from timm_svb.models._helpers import CIFAR10_MEAN, CIFAR100_MEAN, SVB_PAPER_ID, cifar_cfgs
from timm_svb.models._pretrained import (
    HUB_ORG,
    PUBLISHED,
    RECORD_ENV,
    WEIGHTS_FILENAME,
    PretrainedWeightsNotPublishedError,
    RecordError,
    file_sha256,
    shipped_weights_path,
)

CIFAR_BASELINES = [
    "convnet20",
    "convnet38",
    "preact_resnet20",
    "preact_resnet56",
    "preact_resnet68",
    "preact_resnet110",
    "wrn16_8",
    "wrn28_10",
    "wrn40_4",
]
IN1K_BASELINES = ["inception_resnet_v2_preact"]
SVB_NAMES = [f"{n}_svb" for n in CIFAR_BASELINES + IN1K_BASELINES] + ["resnet18_svb", "resnet50_svb"]
ALL_NAMES = CIFAR_BASELINES + IN1K_BASELINES + SVB_NAMES
CIFAR_NAMES = CIFAR_BASELINES + [f"{n}_svb" for n in CIFAR_BASELINES]
# WRN-28-16 is a wider WRN-28-10: built only where its width matters (its parameter count, on the meta device)
REGISTERED = ALL_NAMES + ["wrn28_16", "wrn28_16_svb"]
# created once each (module cache); everything else about them is checked on the same instance
HEAVY = {"inception_resnet_v2_preact", "inception_resnet_v2_preact_svb"}
# one model per family (architecture class)
FAMILY = ["convnet20", "preact_resnet20", "wrn16_8_svb", "inception_resnet_v2_preact", "resnet18_svb"]


# the models the fast tier (-m "not slow") builds: a test of any other takes over ~0.3 s on one loaded core
SMALL = {"convnet20", "convnet38", "preact_resnet20", "convnet20_svb", "convnet38_svb", "preact_resnet20_svb"}


def _params(cases: list) -> list:
    """Parametrisation with every model but the SMALL ones marked slow; a case is a model's name, or a tuple
    of arguments that starts with one."""
    return [
        case
        if (case[0] if isinstance(case, tuple) else case) in SMALL
        else pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=pytest.mark.slow)
        for case in cases
    ]


def _input_size(name: str, small: bool = False) -> tuple[int, int, int]:
    """Input size of the pretrained cfg; when ``small``, the minimal 75x75 for the Inception-ResNet."""
    if small and name.startswith("inception_resnet"):
        return 3, 75, 75
    return timm.get_pretrained_cfg(name).input_size


@functools.cache
def _model(name: str) -> nn.Module:
    """One seeded instance per name; tests that change weights work on a copy."""
    torch.manual_seed(0)
    return timm.create_model(name)


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    """Free the cached models (a few GB) once this module is done."""
    yield
    _model.cache_clear()


def _weight_layers(model: nn.Module, projections: bool = True) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and (projections or not n.endswith("downsample"))
    ]


def _singular_values(module: nn.Module) -> np.ndarray:
    """Reference singular values per group of the (out/g) x (in/g * kh * kw) matrices, numpy float64.

    Taken as the square roots of the float64 SVD of the small Gram matrix (W W^T or W^T W): exact to far
    below the tolerances used here, and several times cheaper than the SVD of W for the wide conv matrices.
    """
    groups = getattr(module, "groups", 1)
    w = module.weight.detach().double().numpy()
    mats = w.reshape(groups, w.shape[0] // groups, -1)
    if mats.shape[1] > mats.shape[2]:
        mats = mats.transpose(0, 2, 1)
    gram = mats @ mats.transpose(0, 2, 1)
    return np.sqrt(np.linalg.svd(gram, compute_uv=False, hermitian=True))


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry():
    assert sorted(timm.list_models("*_svb")) == sorted(n for n in REGISTERED if n.endswith("_svb"))
    assert all(timm.is_model(n) for n in REGISTERED)
    assert set(timm.list_models(module="wide_resnet")) == {n for n in REGISTERED if n.startswith("wrn")}


@pytest.mark.record
def test_announced_is_exactly_the_record():
    ours = set(REGISTERED)
    assert sorted(n for n in timm.list_pretrained() if n.split(".")[0] in ours) == sorted(PUBLISHED)
    assert timm.list_pretrained("*svb*") == sorted(n for n in PUBLISHED if "svb" in n)


@pytest.mark.parametrize("name", _params(ALL_NAMES))
def test_forward_backward(name: str):
    model = _model(name)
    model.train()
    torch.manual_seed(1)
    size = _input_size(name)
    if name in HEAVY and name.endswith("_svb"):  # their baselines (same architecture) run at full size
        size = _input_size(name, small=True) if name.startswith("inception") else (3, 16, 16)
    out = model(torch.randn(2, *size))
    assert out.shape == (2, model.num_classes)
    assert model.num_classes == timm.get_pretrained_cfg(name).num_classes
    out.square().mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    model.zero_grad(set_to_none=True)
    assert model.svb_config == ({"epsilon": 0.5, "bbn_epsilon": 1.0} if name.endswith("_svb") else None)


# the _svb variants share their baseline's class and builder
@pytest.mark.parametrize("name", _params(CIFAR_BASELINES + IN1K_BASELINES + ["resnet18_svb"]))
def test_features_only(name: str):
    model = timm.create_model(name, features_only=True)
    model.eval()
    info = model.feature_info
    c, h, w = _input_size(name, small=True)
    with torch.no_grad():
        feats = model(torch.randn(1, c, h, w))
    assert len(feats) == len(info.channels()) == (5 if name.startswith(("inception", "resnet")) else 4)
    for f, chs, red in zip(feats, info.channels(), info.reduction(), strict=True):
        assert f.shape[1] == chs
        if not name.startswith("inception"):  # valid (unpadded) convs there
            assert f.shape[2:] == (h // red, w // red)
    assert info.reduction()[-1] == (4 if name in CIFAR_NAMES else 32)


@pytest.mark.parametrize("name", _params(FAMILY))
def test_forward_intermediates(name: str):
    model = _model(name)
    model.eval()
    x = torch.randn(1, *_input_size(name, small=True))
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x))
    assert [t.shape[1] for t in inter] == [i["num_chs"] for i in model.feature_info]
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers([1]) == [1]
    with torch.no_grad():
        assert pruned(x).shape == inter[1].shape


@pytest.mark.parametrize("name", _params(FAMILY))
def test_head_and_reset_classifier(name: str):
    model = copy.deepcopy(_model(name))
    model.eval()
    x = torch.randn(2, *_input_size(name, small=True))
    with torch.no_grad():
        feats = model.forward_features(x)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
        assert model.get_classifier().out_features == model.num_classes
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
    model = timm.create_model(name, num_classes=5, global_pool="max", drop_rate=0.2)
    assert model.get_classifier().out_features == 5 and model.global_pool.pool_type == "max"
    assert model.forward_head(torch.randn(2, model.num_features, 4, 4)).shape == (2, 5)


def test_in_chans_and_drop_rate():
    model = timm.create_model("preact_resnet20", in_chans=1, drop_rate=0.5, block_drop_rate=0.3)
    assert model.stem.in_channels == 1 and model.drop_rate == 0.5
    assert isinstance(model.stages[0][0].drop, nn.Dropout) and model.stages[0][0].drop.p == 0.3
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert isinstance(timm.create_model("wrn16_8").stages[0][0].drop, nn.Identity)


@pytest.mark.parametrize("name", _params(["convnet20", "preact_resnet20", "inception_resnet_v2_preact"]))
def test_grad_checkpointing(name: str, monkeypatch: pytest.MonkeyPatch):
    """Checkpointing is on (segments go through torch's checkpoint, counted) and changes no gradient."""
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: calls.append(fn) or checkpoint(fn, *a, **k)
    )
    model = copy.deepcopy(_model(name))
    model.eval()  # same BN statistics in both passes
    x = torch.randn(2, *_input_size(name, small=True))
    model(x).sum().backward()
    assert calls == []
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert len(calls) >= 3  # at least one segment per stage
    for g, p in zip(ref, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)
    calls.clear()
    model.set_grad_checkpointing(False)
    model(x)
    assert calls == []


@pytest.mark.parametrize("name", _params(FAMILY))
def test_group_matcher(name: str):
    model = _model(name)
    groups = group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    assert len(groups) > 3


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["convnet20", "preact_resnet20", "wrn16_8_svb"])
def test_torchscript(name: str):
    model = _model(name)
    model.eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)


@pytest.mark.parametrize(
    "name,expected",
    _params(
        [
            ("convnet20", 20),
            ("convnet38", 38),
            ("preact_resnet20", 20),
            ("preact_resnet56", 56),
            ("preact_resnet68", 68),
            ("preact_resnet110", 110),
            ("wrn16_8", 14),
            ("wrn28_10", 26),
            ("wrn40_4", 38),
        ]
    ),
)
def test_weight_layer_count(name: str, expected: int):
    """6X+2 conv + fc layers, not counting 1x1 projection shortcuts (2 in the ResNets, 3 in the WRNs)."""
    model = _model(name)
    assert len(_weight_layers(model, projections=False)) == expected
    projections = len(_weight_layers(model)) - expected
    assert projections == (0 if name.startswith("convnet") else 2 if name.startswith("preact") else 3)


@pytest.mark.slow
def test_param_counts():
    counts = {name: _num_params(_model(name)) for name in CIFAR_BASELINES if name not in HEAVY}
    assert abs(counts["wrn28_10"] - 36.5e6) <= 0.005 * 36.5e6  # paper, Table 2
    assert counts["preact_resnet110"] == pytest.approx(1.7e6, rel=0.02)  # Table 2, ResNet-110
    for name, count in counts.items():
        assert _num_params(_model(f"{name}_svb")) == count
    # timm's own ResNet layout
    assert _num_params(_model("resnet18_svb")) == 11_689_512
    assert _num_params(_model("resnet50_svb")) == 25_557_032
    assert len(_weight_layers(_model("resnet18_svb"))) == 18 + 3  # + projection shortcuts
    assert len(_weight_layers(_model("resnet50_svb"))) == 50 + 4
    assert _model("resnet50_svb").state_dict().keys() == timm.create_model("resnet50").state_dict().keys()


def test_param_count_wrn28_16():
    """ "Wider ResNet", paper Table 3: only the width differs from WRN-28-10, built on the meta device."""
    assert 93e6 <= _num_params(timm.create_model("wrn28_16", device="meta")) <= 94e6


@pytest.mark.slow
def test_param_counts_heavy():
    irv2 = _num_params(_model("inception_resnet_v2_preact"))
    assert 55e6 < irv2 < 57e6 and _num_params(_model("inception_resnet_v2_preact_svb")) == irv2
    assert len(_weight_layers(_model("inception_resnet_v2_preact"))) == 245


@pytest.mark.parametrize("name", _params(SVB_NAMES))
def test_svb_init_orthogonal(name: str):
    model = _model(name)
    layers = _weight_layers(model)
    assert layers
    for n, m in layers:
        s = _singular_values(m)
        assert np.abs(s - 1).max() < 1e-4, n
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()


def test_baseline_init_not_orthogonal():
    s = _singular_values(_model("convnet20").stages[1][1].conv)
    assert np.abs(s - 1).max() > 0.1


@pytest.mark.parametrize("name", _params(SVB_NAMES))
def test_svb_apply_bounds_every_layer(name: str):
    model = copy.deepcopy(_model(name))
    torch.manual_seed(2)
    with torch.no_grad():  # spread the singular values well outside the band
        for _, m in _weight_layers(model):
            m.weight.mul_(torch.empty(m.weight.shape[0], *[1] * (m.weight.dim() - 1)).uniform_(0.2, 4.0))
    eps = model.svb_config["epsilon"]
    lo, hi = 1 / (1 + eps), 1 + eps
    assert any(_singular_values(m).max() > hi for _, m in _weight_layers(model)[:3])
    SVB.from_model(model).apply()
    for n, m in _weight_layers(model):
        s = _singular_values(m)
        assert s.min() >= lo * (1 - 1e-4) and s.max() <= hi * (1 + 1e-4), n


def test_svb_config_overrides():
    model = timm.create_model("convnet20_svb", svb_epsilon=0.2, bbn_epsilon=0.5)
    assert model.svb_config == {"epsilon": 0.2, "bbn_epsilon": 0.5}
    svb = SVB.from_model(model)
    assert svb.epsilon == 0.2 and svb.bbn_epsilon == 0.5
    assert timm.create_model("convnet20_svb", features_only=True).svb_config["epsilon"] == 0.5
    with pytest.raises(TypeError, match="convnet20_svb"):
        timm.create_model("convnet20", svb_epsilon=0.2)
    with pytest.raises(ValueError, match="epsilon"):
        timm.create_model("convnet20_svb", svb_epsilon=-1)


@pytest.mark.record
@pytest.mark.parametrize("name", REGISTERED)
def test_pretrained_cfg(name: str):
    """The default tag is the data set's first tag whatever is published; only recorded tags have weights,
    pinned to the recorded commit and loaded as model.safetensors through timm-svb's loader."""
    cfg = timm.get_pretrained_cfg(name)
    assert cfg.architecture == name and cfg.license == "apache-2.0" and cfg.paper_ids == SVB_PAPER_ID
    if name.startswith(("convnet", "preact", "wrn")):
        assert cfg.input_size == (3, 32, 32) and cfg.crop_pct == 1.0 and cfg.tag == "cifar10"
        assert cfg.mean == CIFAR10_MEAN and cfg.num_classes == 10
    elif name.startswith("inception"):
        assert cfg.input_size == (3, 299, 299) and cfg.tag == "in1k" and cfg.num_classes == 1000
    else:
        assert cfg.input_size == (3, 224, 224) and cfg.tag == "in1k" and cfg.num_classes == 1000
    for tag in timm.models.get_arch_pretrained_cfgs(name):
        entry, tagged = PUBLISHED.get(tag), timm.get_pretrained_cfg(tag)
        if entry is None:
            assert tagged.hf_hub_id is None and not tagged.has_weights
        elif "package_file" in entry:  # shipped in the package: the file beside the record
            assert tagged.hf_hub_id is None and tagged.custom_load == "hf"
            assert tagged.file == str(shipped_weights_path(tag)) and Path(tagged.file).is_file()
        else:
            assert tagged.hf_hub_id == f"{entry['hf_hub_id']}@{entry['revision']}"
            assert tagged.hf_hub_filename == WEIGHTS_FILENAME and tagged.custom_load == "hf"


@pytest.mark.record
def test_default_tag_does_not_depend_on_the_record():
    for name in ("convnet20", "convnet20_svb"):
        model = timm.create_model(name)
        assert model.num_classes == 10 and model.pretrained_cfg["mean"] == CIFAR10_MEAN


@pytest.mark.parametrize("name", _params(ALL_NAMES))
def test_cfg_names_the_first_conv_and_classifier(name: str):
    model, cfg = _model(name), timm.get_pretrained_cfg(name)
    assert model.pretrained_cfg["architecture"] == name
    assert isinstance(model.get_submodule(cfg.first_conv), nn.Conv2d)
    assert model.get_submodule(cfg.classifier) is model.get_classifier()


@pytest.mark.parametrize(
    "name,input_size,crop_pct",
    _params(
        [
            ("convnet20", (3, 32, 32), 1.0),
            ("wrn28_10_svb", (3, 32, 32), 1.0),
            ("inception_resnet_v2_preact", (3, 299, 299), 0.8975),
            ("resnet50_svb", (3, 224, 224), 0.875),
        ]
    ),
)
def test_resolve_data_config(name: str, input_size: tuple, crop_pct: float):
    data_cfg = resolve_data_config(model=_model(name))
    assert data_cfg["input_size"] == input_size and data_cfg["crop_pct"] == crop_pct
    transform = timm.data.create_transform(**data_cfg)
    img = Image.fromarray(np.zeros((input_size[1] + 8, input_size[2] + 8, 3), dtype=np.uint8))
    assert transform(img).shape == input_size


def test_cifar100_tag():
    model = timm.create_model("preact_resnet20_svb.cifar100")
    assert model.num_classes == 100 and model.pretrained_cfg["mean"] == CIFAR100_MEAN
    assert resolve_data_config(model=model)["mean"] == CIFAR100_MEAN
    assert model.svb_config is not None


def _assert_loads_the_recorded_file(name: str, model_name: str) -> None:
    """``create_model(model_name, pretrained=True)`` gives exactly the tensors of record entry ``name``'s
    file, read from the local Hub cache (skipped when it is not there: tests never download)."""
    entry = PUBLISHED[name]
    if "package_file" in entry:
        path = str(shipped_weights_path(name))
    else:
        path = huggingface_hub.try_to_load_from_cache(
            entry["hf_hub_id"], WEIGHTS_FILENAME, revision=entry["revision"]
        )
    if not isinstance(path, str):
        pytest.skip(f"{name}: the recorded weights are not in the local Hub cache (tests never download)")
    assert file_sha256(path) == entry["sha256"]
    expected, got = (
        safetensors.torch.load_file(path),
        timm.create_model(model_name, pretrained=True).state_dict(),
    )
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in got)


@pytest.mark.record
@pytest.mark.parametrize("name", REGISTERED)
def test_pretrained_true_loads_the_record_or_raises(name: str):
    default = f"{name}.{timm.get_pretrained_cfg(name).tag}"
    if default in PUBLISHED:
        _assert_loads_the_recorded_file(default, name)
        return
    with pytest.raises(PretrainedWeightsNotPublishedError, match=rf"'{default}'") as e:
        timm.create_model(name, pretrained=True)
    assert isinstance(e.value, RuntimeError)
    msg = str(e.value)
    assert "not published" in msg and "pretrained_cfg_overlay" in msg and "local-dir:" in msg


@pytest.mark.record
@pytest.mark.parametrize(
    "name", ["wrn28_10_svb.cifar100", "convnet20.cifar100", "preact_resnet20_svb.cifar100"]
)
def test_pretrained_true_with_a_tag_loads_the_record_or_raises(name: str):
    if name in PUBLISHED:
        _assert_loads_the_recorded_file(name, name)
        return
    with pytest.raises(PretrainedWeightsNotPublishedError, match=name.replace(".", r"\.")):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name", ["convnet20.in1k", "resnet18_svb.cifar10", "convnet20.foo_bar"])
def test_mistyped_tag_raises_like_timm(name: str):
    arch, tag = name.split(".")
    for pretrained in (False, True):
        with pytest.raises(RuntimeError, match=rf"Invalid pretrained tag \({tag}\) for {arch}"):
            timm.create_model(name, pretrained=pretrained)


@pytest.mark.parametrize("name", _params(["convnet20_svb", "resnet18_svb"]))
def test_pretrained_local_file_overlay(name: str, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = copy.deepcopy(_model(name)).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(src.state_dict(), str(path))
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, *_input_size(name))
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    assert model.svb_config == src.svb_config


@pytest.mark.parametrize(
    "name,kwargs",
    _params(
        [
            ("convnet20_svb", dict(svb_epsilon=0.3)),
            ("preact_resnet20", dict(num_classes=100)),
            ("wrn16_8", dict(block_drop_rate=0.3)),
            ("resnet18_svb", dict(num_classes=10)),
            ("inception_resnet_v2_preact", dict(num_classes=10)),
        ]
    ),
)
def test_save_for_hf_local_dir_round_trip(name: str, kwargs: dict, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(3)
    model = timm.create_model(name, **kwargs).eval()
    timm.models.save_for_hf(model, str(tmp_path), safe_serialization=True)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert type(loaded) is type(model) and loaded.num_classes == model.num_classes
    assert loaded.svb_config == model.svb_config
    x = torch.randn(2, *_input_size(name, small=True))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _entry(name: str, **changes) -> dict:
    """A valid record entry for ``name``."""
    svb = {"epsilon": 0.5, "bbn_epsilon": 1.0} if name.split(".")[0].endswith("_svb") else None
    entry = dict(
        hf_hub_id=f"{HUB_ORG}/{name}", revision="a" * 40, sha256="0" * 64, metrics={}, svb_config=svb
    )
    return {**entry, **changes}


def test_published_tag_gets_a_hub_cfg_but_not_the_default(monkeypatch):
    assert HUB_ORG == "timm-svb"
    monkeypatch.setitem(PUBLISHED, "convnet20.cifar100", _entry("convnet20.cifar100"))
    cfgs = _pretrained.pretrained_cfgs(["convnet20"], cifar_cfgs(first_conv="stem.conv", classifier="fc"))
    cfg = cfgs["convnet20.cifar100"]
    assert cfg["hf_hub_id"] == f"timm-svb/convnet20.cifar100@{'a' * 40}"
    assert cfg["hf_hub_filename"] == "model.safetensors" and cfg["custom_load"] == "hf"
    assert "hf_hub_id" not in cfgs["convnet20.cifar10*"]
    default = timm.models.generate_default_cfgs(cfgs)["convnet20"]
    assert default.is_pretrained and list(default.tags)[0] == "cifar10"  # the default stays
    assert sorted(default.tags) == ["c10jpeg", "cifar10", "cifar100"]


def test_record_validation(tmp_path, monkeypatch):
    path = tmp_path / "published.json"
    monkeypatch.setenv(RECORD_ENV, str(path))
    name = "wrn28_10_svb.cifar10"
    entry = _entry(name)
    override = _entry(name, svb_config=None, svb_override="ablation: orthogonal init only")
    for good in ({name: entry}, {name: override}, {"wrn28_10.cifar10": _entry("wrn28_10.cifar10")}):
        path.write_text(json.dumps(good))
        assert _pretrained._load_published() == good
    for bad, match in [
        ({"wrn28_10_svb": entry}, "model_name.tag"),
        ({name: _entry(name, hf_hub_id="someone/wrn28_10_svb.cifar10")}, "hf_hub_id must be"),
        ({name: _entry(name, hf_hub_id="timm-svb/wrn28_10_svb.cifar10-test")}, "hf_hub_id must be"),
        ({name: {k: v for k, v in entry.items() if k != "sha256"}}, r"missing keys \['sha256'\]"),
        ({name: _entry(name, revision="main")}, "40-hex"),
        ({name: _entry(name, sha256="deadbeef")}, "64 hex"),
        ({name: _entry(name, svb_config=None)}, "SVB settings"),
        ({name: _entry(name, svb_config={"epsilon": 0})}, "SVB settings"),
        ({name: _entry(name, extra=1)}, r"unknown keys \['extra'\]"),
        ([entry], "JSON object"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(RecordError, match=match):
            _pretrained._load_published()
    path.write_text("{")
    with pytest.raises(RecordError, match="not valid JSON"):
        _pretrained._load_published()


RECORDS = {
    0: [],
    1: ["convnet20_svb.cifar10"],
    3: ["convnet20_svb.cifar10", "convnet20.cifar100", "preact_resnet20_svb.cifar10"],
}


@pytest.mark.slow
@pytest.mark.parametrize("entries", sorted(RECORDS))
def test_record_dependent_tests_hold_for_records_of(entries: int, tmp_path):
    """The ``record`` tests with records of 0, 1 and 3 entries (weights in a temporary Hub cache), in a fresh
    process that cannot open a socket: the release's ``pytest`` passes whatever is published."""
    cache = tmp_path / "cache"
    record = write_json(tmp_path / "published.json", publish_fake(RECORDS[entries], cache, tmp_path / "w"))
    done = run_record_tests(record, cache, tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
