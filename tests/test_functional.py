"""The SVB/BBN math against independent references: numpy float64 SVD and the written-out formulas."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from timm_svb.functional import (
    band,
    bbn_alpha,
    bbn_gamma,
    bbn_ratio,
    clip_singular_values,
    orthogonal_init_,
    singular_values,
    weight_matrices,
)

# What docs/engine.md promises: float32 weights are in band to within this relative slack after SVB (and a
# matrix within it is left alone); bf16/fp16 weights to within their dtype's machine epsilon.
PROMISED_SLACK = 2e-5
HALF_SLACK = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Linear algebra on one thread: OpenMP threads busy-wait and slow the shared CI cores down."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reference_bound(matrix: np.ndarray, epsilon: float) -> np.ndarray:
    """Algorithm 1 for one matrix, in float64: SVD, clip, rebuild."""
    u, s, vh = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    return (u * np.clip(s, 1 / (1 + epsilon), 1 + epsilon)) @ vh


def with_spectrum(rows: int, cols: int, s_min: float, s_max: float, rng: np.random.Generator) -> np.ndarray:
    """A random rows x cols matrix whose singular values are log-uniform in [s_min, s_max], ends included."""
    p = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, p)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, p)))
    s = np.exp(rng.uniform(np.log(s_min), np.log(s_max), p))
    s[0], s[-1] = s_min, s_max
    return (u * s) @ v.T


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


SHAPES = [(8, 40), (40, 8), (24, 24), (1, 30), (30, 1), (64, 576), (576, 64), (3, 3)]
SPECTRA = [(0.3, 3.0), (0.8, 1.2), (1e-5, 10.0), (1e-3, 1e-2), (5.0, 10.0), (0.95, 30.0)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("epsilon", [0.05, 0.5])
def test_clip_matches_float64_svd(shape, spectrum, epsilon):
    rng = np.random.default_rng(hash((shape, spectrum, epsilon)) % 2**32)
    mats = np.stack([with_spectrum(*shape, *spectrum, rng) for _ in range(3)]).astype(np.float32)
    lo, hi = band(epsilon)
    certified = clip_singular_values(torch.from_numpy(mats), epsilon)
    solved = clip_singular_values(torch.from_numpy(mats), epsilon, certify=False)
    assert not solved.certified.any()
    for i, mat in enumerate(mats):
        s_true = np.linalg.svd(mat.astype(np.float64), compute_uv=False)
        for result in (certified, solved):
            got = result.matrices[i].double().numpy()
            assert rel_err(got, reference_bound(mat, epsilon)) <= 1e-4
            s_got = np.linalg.svd(got, compute_uv=False)
            assert s_got.min() >= lo * (1 - PROMISED_SLACK) and s_got.max() <= hi * (1 + PROMISED_SLACK)
        assert solved.sv_min[i].item() == pytest.approx(s_true.min(), rel=1e-4)
        assert solved.sv_max[i].item() == pytest.approx(s_true.max(), rel=1e-4)
        if certified.certified[i]:  # proved in band: no solver ran, nothing changed
            assert s_true.min() >= lo * (1 - PROMISED_SLACK) and s_true.max() <= hi * (1 + PROMISED_SLACK)
            assert torch.equal(certified.matrices[i], torch.from_numpy(mat))
            assert math.isnan(certified.sv_min[i].item()) and certified.num_clipped[i].item() == 0
        else:
            assert torch.equal(certified.matrices[i], solved.matrices[i])
            assert certified.sv_min[i].item() == solved.sv_min[i].item()


def test_ill_conditioned_takes_float64_fallback_and_is_exact():
    rng = np.random.default_rng(1)
    mats = np.stack([with_spectrum(32, 96, 1e-5, 10.0, rng), with_spectrum(32, 96, 0.9, 1.1, rng)])
    result = clip_singular_values(torch.from_numpy(mats.astype(np.float32)), 0.5)
    assert result.fallback.tolist() == [True, False]
    exact = reference_bound(mats[0].astype(np.float32), 0.5)
    assert rel_err(result.matrices[0].double().numpy(), exact) <= 1e-6
    assert result.sv_min[0].item() == pytest.approx(1e-5, rel=1e-2)  # float32 storage of the input


def test_float64_input_is_computed_in_float64():
    rng = np.random.default_rng(2)
    mat = with_spectrum(20, 50, 1e-3, 5.0, rng)
    result = clip_singular_values(torch.from_numpy(mat)[None], 0.2)
    assert result.matrices.dtype == torch.float64
    assert rel_err(result.matrices[0].numpy(), reference_bound(mat, 0.2)) <= 1e-9


def test_in_band_matrices_are_bitwise_unchanged_and_counted():
    rng = np.random.default_rng(3)
    inside = with_spectrum(16, 48, 0.7, 1.4, rng).astype(np.float32)
    outside = with_spectrum(16, 48, 0.1, 3.0, rng).astype(np.float32)
    result = clip_singular_values(torch.from_numpy(np.stack([inside, outside])), 0.5)
    assert torch.equal(result.matrices[0], torch.from_numpy(inside))
    s = np.linalg.svd(outside.astype(np.float64), compute_uv=False)
    assert result.num_clipped.tolist() == [0, int(((s < 1 / 1.5) | (s > 1.5)).sum())]


def test_bounding_twice_changes_nothing():
    rng = np.random.default_rng(4)
    mats = torch.from_numpy(
        np.stack([with_spectrum(64, 576, 0.1, 4.0, rng) for _ in range(2)]).astype(np.float32)
    )
    once = clip_singular_values(mats, 0.5).matrices
    twice = clip_singular_values(once, 0.5)
    assert twice.num_clipped.sum() == 0
    assert torch.equal(twice.matrices, once)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(8, 16, 3, groups=2),
        nn.Conv2d(12, 12, 3, groups=12),  # depthwise: 12 matrices of 1 x 9
        nn.Conv2d(64, 16, 1),
        nn.Conv1d(6, 10, 5),
        nn.Conv3d(4, 6, (3, 2, 2), groups=2),
        nn.Linear(30, 7),
    ],
)
def test_weight_matrices_match_groups(layer):
    groups = getattr(layer, "groups", 1)
    mats = weight_matrices(layer.weight, groups)
    out = layer.weight.shape[0]
    assert mats.shape == (groups, out // groups, layer.weight[0].numel())
    for g in range(groups):
        block = layer.weight[g * out // groups : (g + 1) * out // groups].reshape(out // groups, -1)
        assert torch.equal(mats[g], block)


def test_weight_matrices_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups"):
        weight_matrices(torch.zeros(6, 2, 3, 3), groups=4)


def test_singular_values_per_group_against_numpy():
    layer = nn.Conv2d(8, 12, 3, groups=4)
    got = singular_values(layer.weight, groups=4)
    w = layer.weight.detach().double().numpy().reshape(4, 3, -1)
    expected = np.stack([np.linalg.svd(m, compute_uv=False) for m in w])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8)


def test_singular_values_ill_conditioned():
    rng = np.random.default_rng(5)
    mat = with_spectrum(10, 30, 1e-7, 10.0, rng)
    got = singular_values(torch.from_numpy(mat))
    np.testing.assert_allclose(got[0].numpy(), np.linalg.svd(mat, compute_uv=False), rtol=1e-6)


def reference_bbn(gamma, var, eps, bbn_eps):
    """Algorithm 2 as written in reference-implementation.md, element by element."""
    sigma = [math.sqrt(v + eps) for v in var]
    alpha = sum(g / s for g, s in zip(gamma, sigma, strict=True)) / len(gamma)
    out = []
    for g, s in zip(gamma, sigma, strict=True):
        if g / (s * alpha) > 1 + bbn_eps:
            g = s * alpha * (1 + bbn_eps)
        elif g / (s * alpha) < 1 / (1 + bbn_eps):
            g = s * alpha / (1 + bbn_eps)
        out.append(g)
    return out


@pytest.mark.parametrize("bbn_eps", [0.05, 0.2, 1.0])
def test_bbn_matches_algorithm_2(bbn_eps):
    rng = np.random.default_rng(6)
    gamma = rng.uniform(0.05, 3.0, 64)
    var = rng.uniform(0.01, 4.0, 64)
    got = bbn_gamma(torch.from_numpy(gamma), torch.from_numpy(var), 1e-5, bbn_eps)
    np.testing.assert_allclose(got.numpy(), reference_bbn(gamma, var, 1e-5, bbn_eps), rtol=1e-12)
    changed = got.numpy() != gamma
    assert changed.any() and not changed.all()


def test_bbn_rel_mode_matches_reference_code():
    gamma = torch.tensor([0.1, 0.9, 1.0, 1.1, 5.0], dtype=torch.float64)
    m = gamma.mean().item()
    expected = [min(max(g / m, 0.5), 2.0) * m for g in gamma.tolist()]
    got = bbn_gamma(gamma, None, 1e-5, 1.0, mode="rel")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(bbn_ratio(gamma, None, 0, "rel").numpy(), (gamma / m).numpy(), rtol=1e-12)


def test_bbn_float32_gamma_keeps_dtype_and_in_band_values():
    gamma = torch.tensor([1.0, 1.01, 0.99, 3.5])  # alpha = 1.625: only 3.5 is out of band
    got = bbn_gamma(gamma, torch.ones(4), 1e-5, 1.0)
    assert got.dtype == torch.float32
    assert torch.equal(got[:3], gamma[:3]) and got[3] < gamma[3]


def test_bbn_bad_mode_and_missing_var():
    with pytest.raises(ValueError, match="bbn_mode"):
        bbn_gamma(torch.ones(3), torch.ones(3), 1e-5, 1.0, mode="abs")
    with pytest.raises(ValueError, match="running variance"):
        bbn_gamma(torch.ones(3), None, 1e-5, 1.0)


@pytest.mark.parametrize("epsilon", [0, -1, float("nan"), float("inf"), "x"])
def test_band_rejects_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        band(epsilon)


def test_orthogonal_init_all_singular_values_one():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 32, 3, groups=4),
        nn.Conv2d(32, 32, 3, groups=32),
        nn.Conv1d(4, 64, 1),
        nn.Conv3d(2, 4, 3),
        nn.Linear(32, 10),
        nn.Linear(10, 100),
    )
    with torch.no_grad():
        model[1].weight.fill_(3.0)
        model[1].bias.fill_(2.0)
    bias_before = model[0].bias.clone()
    orthogonal_init_(model, generator=torch.Generator().manual_seed(0))
    for layer in model:
        if isinstance(layer, nn.BatchNorm2d):
            assert torch.equal(layer.weight, torch.ones(16)) and torch.equal(layer.bias, torch.zeros(16))
            continue
        groups = getattr(layer, "groups", 1)
        w = layer.weight.detach().double().numpy().reshape(groups, layer.weight.shape[0] // groups, -1)
        for mat in w:
            np.testing.assert_allclose(np.linalg.svd(mat, compute_uv=False), 1.0, atol=1e-5)
    assert torch.equal(model[0].bias, bias_before)


def test_orthogonal_init_is_seeded():
    a, b = nn.Linear(20, 30), nn.Linear(20, 30)
    orthogonal_init_(a, generator=torch.Generator().manual_seed(7))
    orthogonal_init_(b, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("memory_format", ["channels_last", "transposed view"])
def test_orthogonal_init_keeps_memory_format_and_layout(memory_format):
    # 1x1 and depthwise convs are the channels_last layouts whose matrix view aliases the weight
    convs = [nn.Conv2d(8, 16, 3, groups=2), nn.Conv2d(16, 32, 1), nn.Conv2d(12, 12, 3, groups=12)]
    lin = nn.Linear(12, 20)
    if memory_format == "channels_last":
        convs = [conv.to(memory_format=torch.channels_last) for conv in convs]
    else:  # a weight that is a transposed view of its storage
        lin.weight = nn.Parameter(torch.randn(12, 20).T)
    orthogonal_init_(nn.Sequential(*convs, lin), generator=torch.Generator().manual_seed(0))
    if memory_format == "channels_last":
        assert all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convs)
    else:
        assert lin.weight.stride() == (1, 20)
    for layer in [*convs, lin]:
        groups = getattr(layer, "groups", 1)
        w = layer.weight.detach().double().numpy().reshape(groups, layer.weight.shape[0] // groups, -1)
        for mat in w:
            np.testing.assert_allclose(np.linalg.svd(mat, compute_uv=False), 1.0, atol=1e-5)


# ------------------------------------------------------------------ precision settings

_PRECISION_KEYS = [
    ("generic", "all"),
    ("cuda", "all"),
    ("cuda", "matmul"),
    ("mkldnn", "all"),
    ("mkldnn", "matmul"),
]


def _set_precision(backend: str, op: str, value: str) -> None:
    torch._C._set_fp32_precision_setter(backend, op, value)


def reset_precision() -> None:
    """torch's defaults: legacy 'highest', every per-backend matmul setting inheriting ("none")."""
    torch.set_float32_matmul_precision("highest")
    for key in _PRECISION_KEYS:
        _set_precision(*key, "none")


PRECISION_SETTINGS = {
    "nothing set": lambda: None,
    "backends.fp32_precision=tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
    "cuda.matmul.fp32_precision=tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    "mkldnn.matmul.fp32_precision=bf16": lambda: setattr(
        torch.backends.mkldnn.matmul, "fp32_precision", "bf16"
    ),
    "legacy medium": lambda: torch.set_float32_matmul_precision("medium"),
    "legacy allow_tf32": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "generic tf32, cuda.all ieee, mkldnn.matmul bf16": lambda: [
        _set_precision("generic", "all", "tf32"),
        _set_precision("cuda", "all", "ieee"),
        _set_precision("mkldnn", "matmul", "bf16"),
    ],
}


def precision_fingerprint() -> list[tuple]:
    """What a user reads back, and how each setting follows its parents: destructive (probes the parents)."""

    def read() -> tuple:
        try:
            legacy = torch.get_float32_matmul_precision()
        except RuntimeError:  # torch refuses to answer for some mixes of the legacy and new APIs
            legacy = "mixed"
        return (legacy, *(torch._C._get_fp32_precision_getter(*key) for key in _PRECISION_KEYS))

    seen = [read()]
    for parent in [("generic", "all"), ("cuda", "all"), ("mkldnn", "all")]:
        for value in ("ieee", "tf32"):
            _set_precision(*parent, value)
            seen.append(read())
    return seen


def precision_in_force() -> tuple:
    return (
        torch.backends.cuda.matmul.fp32_precision,
        torch.backends.mkldnn.matmul.fp32_precision,
        torch.get_float32_matmul_precision(),
        torch.is_autocast_enabled("cpu"),
        torch.is_autocast_enabled("cuda"),
    )


IEEE_FLOAT32 = ("ieee", "ieee", "highest", False, False)


class PrecisionRecorder(TorchFunctionMode):
    """Records the precision settings in force at every matmul, eigh and SVD the engine runs."""

    OPS = {"matmul", "__matmul__", "mm", "bmm", "baddbmm", "baddbmm_", "linalg_eigh", "linalg_cholesky_ex"}
    OPS |= {"linalg_svd", "linalg_svdvals"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.OPS:
            self.seen.append(precision_in_force())
            self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def clean_precision():
    reset_precision()
    yield
    reset_precision()


@pytest.mark.parametrize("setting", list(PRECISION_SETTINGS))
def test_engine_math_is_ieee_float32_under_every_precision_setting(setting, clean_precision):
    rng = np.random.default_rng(8)
    # out of band (the solver), ill-conditioned (the float64 routes) and in band (the certificate factorises)
    spectra = [(0.2, 4.0), (1e-4, 4.0), (0.8, 1.2)]
    mats = np.stack([with_spectrum(32, 96, lo, hi, rng) for lo, hi in spectra]).astype(np.float32)
    PRECISION_SETTINGS[setting]()
    with PrecisionRecorder() as recorder:
        result = clip_singular_values(torch.from_numpy(mats), 0.5)
        spectrum = singular_values(torch.from_numpy(mats[1]))
    assert recorder.seen and set(recorder.seen) == {IEEE_FLOAT32}
    assert {"bmm", "linalg_cholesky_ex", "linalg_eigh"} <= recorder.names  # certificate and solver
    for got, mat in zip(result.matrices, mats, strict=True):
        assert rel_err(got.double().numpy(), reference_bound(mat, 0.5)) <= 1e-4
    np.testing.assert_allclose(spectrum[0].numpy(), np.linalg.svd(mats[1].astype(np.float64))[1], rtol=1e-6)
    after = precision_fingerprint()
    reset_precision()
    PRECISION_SETTINGS[setting]()
    assert after == precision_fingerprint()  # the user's settings, inheritance ("none") included


def test_engine_math_ignores_autocast(clean_precision):
    rng = np.random.default_rng(9)
    mat = with_spectrum(32, 96, 0.2, 4.0, rng).astype(np.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), PrecisionRecorder() as recorder:
        result = clip_singular_values(torch.from_numpy(mat)[None], 0.5)
        assert torch.is_autocast_enabled("cpu")
    assert recorder.seen and set(recorder.seen) == {IEEE_FLOAT32}
    assert result.matrices.dtype == torch.float32
    assert rel_err(result.matrices[0].double().numpy(), reference_bound(mat, 0.5)) <= 1e-4


# ------------------------------------------------------------------ routes, their limits and accuracy


def route_taken(monkeypatch, mat: np.ndarray, epsilon: float = 0.5):
    """Bound one matrix and tell which route took it, seen from the solvers it called."""
    eigh_dtypes, svd_calls = set(), []
    real_eigh, real_svd = torch.linalg.eigh, torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "eigh", lambda g: eigh_dtypes.add(g.dtype) or real_eigh(g))
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: svd_calls.append(1) or real_svd(*a, **k))
    result = clip_singular_values(torch.from_numpy(mat)[None], epsilon)
    monkeypatch.undo()
    if svd_calls:
        route = "svd"
    elif result.fallback.item():
        route = "float64 gram"
    else:
        route = "float64 eigh" if torch.float64 in eigh_dtypes else "float32 eigh"
    return route, result


@pytest.mark.parametrize(
    ("dtype", "cond", "route"),
    [
        (np.float32, 2.4, "float32 eigh"),
        (np.float32, 2.6, "float64 eigh"),
        (np.float32, 9.5, "float64 eigh"),
        (np.float32, 10.5, "float64 gram"),
        (np.float32, 0.8e5, "float64 gram"),
        (np.float32, 1.25e5, "svd"),
        (np.float64, 800.0, "float64 gram"),  # float64 weights: their 1e-10 slack limits the Gram to 1e3
        (np.float64, 1250.0, "svd"),
    ],
)
def test_route_limits_are_pinned(dtype, cond, route, monkeypatch):
    """_ROUTES' limits from both sides: condition numbers 2.5, 10 and 1e5 (1e3 for float64 weights)."""
    rng = np.random.default_rng(10)
    mat = with_spectrum(48, 432, 0.2, 0.2 * cond, rng).astype(dtype)
    taken, result = route_taken(monkeypatch, mat)
    assert taken == route
    assert result.fallback.item() == (route in ("float64 gram", "svd"))
    assert rel_err(result.matrices[0].double().numpy(), reference_bound(mat, 0.5)) <= 5e-6


def edge_heavy(rows: int, cols: int, cond: float, rng: np.random.Generator) -> np.ndarray:
    """A quarter of the singular values at each end of [s_min, s_max], as after an SVB step and some SGD."""
    p = min(rows, cols)
    s = np.exp(rng.uniform(0, np.log(cond), p))
    s[: p // 4], s[p // 4 : p // 2] = 1.0, cond
    s *= 1.5 / cond * 0.9  # s_max 1.35 in band, s_min below it
    u, _ = np.linalg.qr(rng.standard_normal((rows, p)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, p)))
    return (u * s) @ v.T


@pytest.mark.parametrize(("cond", "route"), [(2.45, "float32 eigh"), (9.9, "float64 eigh")])
@pytest.mark.parametrize("shape", [(64, 576), pytest.param((320, 2880), marks=pytest.mark.slow)])
def test_route_accuracy_at_its_limit(shape, cond, route, monkeypatch):
    """_ROUTES' comment: at each float32 route's limit the smallest singular values are resolved to 5e-6
    and clipped values land within 5e-6 of the band edge, a quarter of the slack, so the next apply leaves
    them alone (640 x 5760: tests/test_svb.py::test_wrn28_10_sized_layers_near_the_limits)."""
    rng = np.random.default_rng(12)
    mat = edge_heavy(*shape, cond, rng).astype(np.float32)
    taken, result = route_taken(monkeypatch, mat)
    assert taken == route
    got = result.matrices[0].double().numpy()
    s_true = np.linalg.svd(mat.astype(np.float64), compute_uv=False)
    assert result.sv_min.item() == pytest.approx(s_true.min(), rel=5e-6)
    s_got = np.linalg.svd(got, compute_uv=False)
    assert s_got.min() >= (1 / 1.5) * (1 - 5e-6)
    assert rel_err(got, reference_bound(mat, 0.5)) <= 5e-6
    again = clip_singular_values(result.matrices, 0.5)
    assert again.num_clipped.item() == 0 and torch.equal(again.matrices, result.matrices)


def spectrum_at(rows: int, cols: int, values: list[float], rng: np.random.Generator) -> np.ndarray:
    """A rows x cols float64 matrix with the given singular values (the rest 1.0)."""
    p = min(rows, cols)
    s = np.ones(p)
    s[: len(values)] = values
    u, _ = np.linalg.qr(rng.standard_normal((rows, p)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, p)))
    return (u * s) @ v.T


def test_band_slack_is_the_promised_2e5():
    lo, hi = band(0.5)
    rng = np.random.default_rng(13)
    within = spectrum_at(16, 48, [hi * (1 + 1e-5), lo * (1 - 1e-5)], rng).astype(np.float32)
    beyond = spectrum_at(16, 48, [hi * (1 + 4e-5), lo * (1 - 4e-5), lo * (1 - 1e-5)], rng).astype(np.float32)
    result = clip_singular_values(torch.from_numpy(np.stack([within, beyond])), 0.5)
    assert result.num_clipped.tolist() == [0, 2]  # lo * (1 - 1e-5) is within the slack: not counted
    assert torch.equal(result.matrices[0], torch.from_numpy(within))
    s_got = np.linalg.svd(result.matrices[1].double().numpy(), compute_uv=False)
    assert s_got.max() == pytest.approx(hi, rel=3e-6)
    assert s_got.min() == pytest.approx(lo * (1 - 1e-5), rel=3e-6)  # left where it was


# ------------------------------------------------------------------ degenerate and extreme weights


def test_zero_matrix_is_left_alone_and_reported_degenerate():
    rng = np.random.default_rng(14)
    other = with_spectrum(8, 24, 0.1, 3.0, rng).astype(np.float32)
    mats = torch.from_numpy(np.stack([np.zeros((8, 24), np.float32), other]))
    result = clip_singular_values(mats, 0.5)
    assert result.degenerate.tolist() == [True, False]
    assert result.num_clipped[0].item() == 0 and result.num_clipped[1].item() > 0
    assert torch.equal(result.matrices[0], mats[0])
    assert result.sv_min[0].item() == result.sv_max[0].item() == 0.0
    assert rel_err(result.matrices[1].double().numpy(), reference_bound(other, 0.5)) <= 1e-5


@pytest.mark.parametrize("magnitude", [1e-24, 1e-30, 1e20, 1e30])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiny_and_huge_weights_are_bounded_exactly(magnitude, dtype):
    rng = np.random.default_rng(15)
    mats = np.stack([with_spectrum(16, 48, 0.5, 2.0, rng), with_spectrum(16, 48, 0.01, 5.0, rng)])
    mats = (mats * magnitude).astype(dtype)
    result = clip_singular_values(torch.from_numpy(mats), 0.5)
    assert torch.isfinite(result.matrices).all()
    for i, mat in enumerate(mats):
        s_true = np.linalg.svd(mat.astype(np.float64), compute_uv=False)
        assert result.num_clipped[i].item() == 16
        assert result.sv_min[i].item() == pytest.approx(s_true.min(), rel=1e-5)
        assert result.sv_max[i].item() == pytest.approx(s_true.max(), rel=1e-5)
        assert rel_err(result.matrices[i].double().numpy(), reference_bound(mat, 0.5)) <= 1e-5


def test_rank_deficient_matrix_takes_the_svd_and_ends_in_band():
    rng = np.random.default_rng(16)
    mat = with_spectrum(12, 40, 0.5, 2.0, rng).astype(np.float32)
    mat[3] = 0  # a dead output channel: one singular value 0
    result = clip_singular_values(torch.from_numpy(mat)[None], 0.5)
    assert result.fallback.item() and not result.degenerate.item()
    assert result.sv_min.item() == pytest.approx(0.0, abs=1e-6)
    s_got = np.linalg.svd(result.matrices[0].double().numpy(), compute_uv=False)
    assert s_got.min() >= (1 / 1.5) * (1 - 1e-6) and s_got.max() <= 1.5 * (1 + 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 3), (1, 30), (16, 144), (64, 64), (128, 16), (160, 1440)])
def test_half_precision_results_settle(dtype, shape):
    """BAND_SLACK's comment: rounding the bounded matrix to bf16/fp16 moves its singular values by well
    under the dtype's epsilon, so a second bound of the stored result changes nothing."""
    torch.manual_seed(17)
    w = torch.randn(4, *shape) * (3.0 / shape[1] ** 0.5) * torch.tensor([0.05, 0.5, 1.0, 3.0])[:, None, None]
    once = clip_singular_values(w.to(dtype), 0.5)
    stored = once.matrices.to(dtype)
    s = torch.linalg.svdvals(stored.double())
    slack = HALF_SLACK[dtype]
    assert s.min() >= (1 / 1.5) * (1 - slack) and s.max() <= 1.5 * (1 + slack)
    twice = clip_singular_values(stored, 0.5)
    assert twice.num_clipped.sum() == 0
    assert torch.equal(twice.matrices.to(dtype), stored)


# ------------------------------------------------------------------ BBN edge cases


@pytest.mark.parametrize(
    "gamma",
    [[0.0, 0.0, 0.0, 0.0], [0.5, -1.0, -2.0, 0.1], [-1e-3, 2e-3, -4e-3, 0.0]],
    ids=["zero", "negative mean", "tiny negative mean"],
)
@pytest.mark.parametrize("mode", ["sigma", "rel"])
def test_bbn_leaves_gammas_averaging_to_zero_or_below(gamma, mode):
    gamma = torch.tensor(gamma)
    var = torch.tensor([0.5, 1.0, 2.0, 4.0])
    assert not bbn_alpha(gamma, var, 1e-5, mode) > 0
    got = bbn_gamma(gamma, var, 1e-5, 1.0, mode)
    assert torch.equal(got, gamma)


def test_bbn_alpha_against_the_formula():
    gamma, var = [0.3, 1.2, 2.0], [0.5, 1.5, 4.0]
    expected = sum(g / math.sqrt(v + 1e-5) for g, v in zip(gamma, var, strict=True)) / 3
    got = bbn_alpha(torch.tensor(gamma, dtype=torch.float64), torch.tensor(var, dtype=torch.float64), 1e-5)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert bbn_alpha(torch.tensor(gamma), None, 1e-5, "rel").item() == pytest.approx(sum(gamma) / 3, rel=1e-6)
