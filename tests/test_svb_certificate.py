"""The in-band certificate (one Cholesky per shape instead of a solver) and the no-sync path of SVB.apply.

The certificate may send a matrix to the solver needlessly, never skip one wrongly: every test of it
compares with a float64 SVD of the very matrix it saw (after rounding to its dtype).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from test_functional import (
    one_thread,  # noqa: F401  (autouse: this module on one thread too)
    reference_bound,
    rel_err,
    with_spectrum,
)
from torch import nn

import timm_svb._solver as solver
from timm_svb import SVB
from timm_svb.functional import band, band_slack, certify_in_band, clip_singular_values

LO, HI = band(0.5)


def with_values(rows: int, cols: int, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A float64 ``rows x cols`` matrix with exactly the singular values ``values`` (``min(rows, cols)``)."""
    p = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, p)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, p)))
    return (u * values) @ v.T


def true_extremes(mat: torch.Tensor) -> tuple[float, float]:
    s = np.linalg.svd(mat.double().numpy(), compute_uv=False)
    return float(s.min()), float(s.max())


def in_slack_band(mat: torch.Tensor, dtype: torch.dtype) -> bool:
    """What the certificate promises, decided by a float64 SVD of the matrix as stored."""
    slack = band_slack(dtype)
    s_min, s_max = true_extremes(mat)
    return s_min >= LO * (1 - slack) and s_max <= HI * (1 + slack)


# ------------------------------------------------------------------ the certificate's soundness

EDGE_DISTANCES = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("edge", ["lo", "hi"])
def test_just_inside_and_just_outside_each_edge(dtype, edge):
    """Values 1e-7 .. 1e-3 (relative) inside and outside each slack edge: nothing outside is certified, the
    result is always what a float64 SVD says (in band: bit for bit unchanged; outside the slack: clipped)."""
    rng = np.random.default_rng(30)
    slack = band_slack(dtype)
    target = LO * (1 - slack) if edge == "lo" else HI * (1 + slack)
    mats = []
    for distance in EDGE_DISTANCES:
        for sign in (-1, 1):
            values = rng.uniform(0.8, 1.2, 24)
            values[0] = target * (1 + sign * distance)
            mats.append(with_values(24, 96, values, rng))
    stack = torch.from_numpy(np.stack(mats)).to(dtype)
    certified = certify_in_band(stack, 0.5)
    result = clip_singular_values(stack, 0.5)
    assert torch.equal(result.certified, certified)
    for i, mat in enumerate(stack):
        s_min, s_max = true_extremes(mat)
        beyond = max(LO * (1 - slack) / s_min, s_max / (HI * (1 + slack))) - 1  # > 0: outside the slack
        assert beyond <= 0 or not certified[i], (i, s_min, s_max)
        if beyond < -1e-5:  # clearly inside (beyond the solver's own 5e-6): bit for bit unchanged
            assert result.num_clipped[i] == 0 and torch.equal(result.matrices[i].to(dtype), mat)
        elif beyond > 1e-5:  # clearly outside: clipped into the band
            assert result.num_clipped[i] >= 1
        if result.num_clipped[i]:
            s = np.linalg.svd(result.matrices[i].double().numpy(), compute_uv=False)
            assert s.min() >= LO * (1 - 5e-6) and s.max() <= HI * (1 + 5e-6)
        else:
            assert torch.equal(result.matrices[i].to(dtype), mat)
    assert certified.any()  # values 1e-3 inside the slack edge of a small matrix are certified


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_never_certifies_a_matrix_a_float64_svd_puts_outside_the_band(dtype):
    """Property test: random shapes, random spectra with one or both extremes within 1e-9 .. 1e-3
    (relative, log-uniform) of a slack edge on either side. Without the certificate's rounding margin
    this fails: values within a few 1e-7 beyond an edge are then certified about half the time."""
    rng = np.random.default_rng(31)
    slack = band_slack(dtype)
    wrong, outside, checked = [], 0, 0
    for trial in range(40):
        rows, cols = (int(x) for x in rng.integers(2, 48, 2))
        cols = cols * int(rng.integers(1, 12))
        p = min(rows, cols)
        mats = []
        for _ in range(8):
            values = rng.uniform(LO * 1.05, HI * 0.95, p)
            distance = 10.0 ** rng.uniform(-9, -3)
            sign = rng.choice([-1.0, 1.0])
            if rng.random() < 0.5:
                values[0] = LO * (1 - slack) * (1 - sign * distance)
            if rng.random() < 0.7 or p == 1:
                values[-1] = HI * (1 + slack) * (1 + sign * distance)
            mats.append(with_values(rows, cols, values, rng))
        stack = torch.from_numpy(np.stack(mats)).to(dtype)
        for mat, ok in zip(stack, certify_in_band(stack, 0.5).tolist(), strict=True):
            checked += 1
            if not in_slack_band(mat, dtype):
                outside += 1
                if ok:
                    wrong.append((trial, tuple(mat.shape), true_extremes(mat)))
    assert outside > 50 and checked == 320
    assert not wrong


@pytest.mark.slow
def test_certifies_in_band_matrices_at_wrn_sizes():
    """The certificate is not vacuous: matrices 1.5% inside both edges are certified, at WRN-28-10's shapes
    (its margin is 0.0106 in s^2 for 640 x 5760: 1.2% of s at the lower edge)."""
    rng = np.random.default_rng(32)
    for rows, cols in [(160, 1440), (320, 2880), (640, 5760), (1440, 160)]:
        p = min(rows, cols)
        values = rng.uniform(LO * 1.015, HI * 0.985, p)
        values[[0, -1]] = LO * 1.015, HI * 0.985
        mat = torch.from_numpy(with_values(rows, cols, values, rng)).float()[None]
        assert certify_in_band(mat, 0.5).item(), (rows, cols)
        result = clip_singular_values(mat, 0.5)
        assert result.certified.item() and result.matrices.data_ptr() == mat.data_ptr()  # no copy


def test_ill_conditioned_rank_deficient_and_zero_are_never_certified():
    rng = np.random.default_rng(33)
    ill = with_spectrum(32, 96, 1e-5, 1.2, rng)
    deficient = with_spectrum(32, 96, 0.8, 1.2, rng)
    deficient[5] = 0
    mats = torch.from_numpy(
        np.stack([ill, deficient, np.zeros((32, 96)), with_spectrum(32, 96, 0.8, 1.2, rng)])
    )
    mats = mats.float()
    result = clip_singular_values(mats, 0.5)
    assert result.certified.tolist() == [False, False, False, True]
    assert result.degenerate.tolist() == [False, False, True, False]
    assert rel_err(result.matrices[0].double().numpy(), reference_bound(mats[0].numpy(), 0.5)) <= 1e-5
    s = np.linalg.svd(result.matrices[1].double().numpy(), compute_uv=False)  # the zero direction: raised
    assert s.min() >= LO * (1 - 1e-6) and s.max() <= 1.2 * (1 + 1e-6)


def test_tiny_huge_and_non_finite_matrices_go_to_the_solver():
    rng = np.random.default_rng(34)
    base = with_spectrum(16, 48, 0.8, 1.2, rng)
    nan = base.copy()
    nan[2, 3] = np.nan
    mats = torch.from_numpy(np.stack([base * 1e-24, base * 1e20, nan, base])).float()
    result = clip_singular_values(mats, 0.5)
    assert result.certified.tolist() == [False, False, False, True]
    assert result.nonfinite.tolist() == [False, False, True, False]
    assert result.num_clipped[:2].tolist() == [16, 16]
    assert torch.equal(result.matrices[2].nan_to_num(7.0), mats[2].nan_to_num(7.0))  # left as it was
    assert torch.equal(result.matrices[3], mats[3])


@pytest.mark.parametrize("batched", [False, True], ids=["cpu accumulation", "gpu batched chunks"])
def test_gram_rounding_error_is_within_the_bound_the_margin_uses(batched, monkeypatch):
    """_gram's entrywise error (float32) stays within gamma_d |X||X|^T, the bound the certificate's margin
    is built on, on the CPU path and on the GPU path run on the CPU. The reference is the float64 Gram of
    the same float32 data (exact products, sums to ~1e-16)."""
    monkeypatch.setattr(solver, "_batched_gram", lambda device: batched)
    torch.manual_seed(35)
    parts = [torch.randn(2, 40, 1000), torch.randn(1, 40, 1000) * 3, torch.randn(1, 1000, 40).mT]
    gram, depth = solver._gram(parts)
    assert depth == 250 + 4 + 1  # 1000 columns in 4 chunks of 250
    x = torch.cat(parts).double()
    bound = solver._gamma(depth, 2.0**-24) * (x.abs() @ x.abs().mT)
    err = (gram.double() - x @ x.mT).abs()
    lower = torch.ones(40, 40, dtype=torch.bool).tril()
    assert (err[:, lower] <= bound[:, lower]).all()
    assert err[:, lower].max() > 0  # rounding did happen


def test_gpu_gram_path_gives_the_same_decisions(monkeypatch):
    rng = np.random.default_rng(36)
    mats = torch.from_numpy(
        np.stack(
            [with_spectrum(40, 600, LO * s, HI * t, rng) for s, t in [(1.01, 0.99), (0.9, 1.0), (1.1, 1.1)]]
        )
    ).float()
    cpu = clip_singular_values(mats, 0.5)
    monkeypatch.setattr(solver, "_batched_gram", lambda device: True)
    gpu = clip_singular_values(mats, 0.5)
    assert cpu.certified.tolist() == gpu.certified.tolist() == [True, False, False]
    assert torch.allclose(cpu.matrices, gpu.matrices, rtol=0, atol=1e-6)


def test_solvers_read_only_the_lower_triangle():
    """_gram fills the lower triangle only: Cholesky and eigh must ignore the strict upper one."""
    torch.manual_seed(37)
    a = torch.randn(3, 12, 40, dtype=torch.float64)
    g = a @ a.mT
    junk = g.clone()
    upper = torch.ones(12, 12, dtype=torch.bool).triu(1)
    junk[:, upper] = float("nan")
    for matrix in (g - 0.5 * torch.eye(12, dtype=torch.float64), g):
        spoiled = junk - 0.5 * torch.eye(12, dtype=torch.float64) if matrix is not g else junk
        assert torch.equal(torch.linalg.cholesky_ex(matrix).L, torch.linalg.cholesky_ex(spoiled).L)
    assert torch.equal(torch.linalg.eigh(g)[0], torch.linalg.eigh(junk)[0])
    assert torch.equal(torch.linalg.eigh(g.float())[1], torch.linalg.eigh(junk.float())[1])


# ------------------------------------------------------------------ the plugin: statistics, groups, options


def linear(weight: np.ndarray, dtype: torch.dtype = torch.float32) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
    return layer.to(dtype)


def test_certified_layers_report_no_values_and_certify_false_reports_all():
    rng = np.random.default_rng(38)
    weights = [with_spectrum(24, 72, 0.8, 1.2, rng), with_spectrum(24, 72, 0.3, 2.0, rng)]
    net = nn.Sequential(*(linear(w.astype(np.float32)) for w in weights))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    stats = SVB(net, epsilon=0.5).apply(per_layer=True)
    assert stats.certified == 1 and stats.per_layer["0"].certified and not stats.per_layer["1"].certified
    assert math.isnan(stats.per_layer["0"].sv_min) and stats.per_layer["0"].clipped == 0
    s1 = np.linalg.svd(weights[1].astype(np.float32).astype(np.float64), compute_uv=False)
    assert stats.sv_min == pytest.approx(s1.min(), rel=1e-5) and stats.sv_max == pytest.approx(
        s1.max(), rel=1e-5
    )
    assert stats.to_dict()["svb/certified"] == 1
    after = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    exact = SVB(net, epsilon=0.5, certify=False).apply(per_layer=True)
    assert exact.certified == 0
    s0 = np.linalg.svd(weights[0].astype(np.float32).astype(np.float64), compute_uv=False)
    assert exact.per_layer["0"].sv_min == pytest.approx(s0.min(), rel=1e-5)
    for k, v in net.state_dict().items():
        assert torch.equal(v, after[k]), k  # the same weights either way


def test_grouped_layer_with_some_groups_certified():
    """A grouped conv whose groups are partly in band: the certified groups are kept bit for bit, the
    others bounded; the layer is not reported certified and its statistics cover the solved groups."""
    rng = np.random.default_rng(39)
    conv = nn.Conv2d(8, 8, 3, groups=4, bias=False)
    groups = [
        with_spectrum(2, 18, *spectrum, rng) for spectrum in [(0.8, 1.2), (0.3, 2.0), (0.9, 1.1), (0.2, 1.0)]
    ]
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.stack(groups).reshape(8, 2, 3, 3)))
    before = conv.weight.detach().clone().reshape(4, 2, 18)
    stats = SVB(nn.Sequential(conv), epsilon=0.5).apply(per_layer=True)
    row = stats.per_layer["0"]
    assert not row.certified and row.clipped > 0
    after = conv.weight.detach().reshape(4, 2, 18)
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    for g in (1, 3):
        assert rel_err(after[g].double().numpy(), reference_bound(before[g].numpy(), 0.5)) <= 1e-5
    assert row.sv_min == pytest.approx(min(true_extremes(before[g])[0] for g in (1, 3)), rel=1e-5)


# ------------------------------------------------------------------ no host syncs in the hot path

SYNCING = ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"]


@contextmanager
def counted_host_syncs() -> Iterator[Counter]:
    """Count every call that makes the host wait for a device tensor's values (on a GPU, a sync): value
    reads (item, tolist, bool/int/float conversion, numpy), host copies, and data-dependent shapes
    (nonzero, boolean-mask indexing). On the CPU they cost nothing, but each would stall a GPU; so the
    engine runs its GPU path here (the certificate's CPU-only read of which matrices to factorise is off)."""
    counts: Counter = Counter()
    real_skips = solver._skips_hopeless
    solver._skips_hopeless = lambda device: False
    originals = {name: getattr(torch.Tensor, name) for name in [*SYNCING, "__getitem__"]}

    def counting(name, real):
        def call(self, *args, **kwargs):
            counts[name] += 1
            return real(self, *args, **kwargs)

        return call

    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
            counts["boolean mask"] += 1
        return originals["__getitem__"](self, index)

    real_nonzero = torch.nonzero
    try:
        for name in SYNCING:
            setattr(torch.Tensor, name, counting(name, originals[name]))
        torch.Tensor.__getitem__ = getitem
        torch.nonzero = counting("torch.nonzero", real_nonzero)
        yield counts
    finally:
        for name, real in originals.items():
            setattr(torch.Tensor, name, real)
        torch.nonzero = real_nonzero
        solver._skips_hopeless = real_skips


def stack_net(layers_out_of_band: int, layers_in_band: int, seed: int = 40) -> nn.Sequential:
    """Linear layers of one shape (one stack), some out of band, plus BN layers and another shape."""
    rng = np.random.default_rng(seed)
    mats = [with_spectrum(16, 48, 0.3, 2.0, rng) for _ in range(layers_out_of_band)]
    mats += [with_spectrum(16, 48, 0.8, 1.2, rng) for _ in range(layers_in_band)]
    layers: list[nn.Module] = [linear(m.astype(np.float32)) for m in mats]
    layers += [
        nn.BatchNorm1d(16),
        nn.BatchNorm1d(16),
        linear(with_spectrum(8, 16, 0.8, 1.2, rng).astype(np.float32)),
    ]
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.2, 3.0)
                m.running_var.uniform_(0.5, 2.0)
    return net


def test_apply_with_every_layer_certified_reads_the_device_once():
    net = stack_net(0, 5)
    svb = SVB(net, epsilon=0.5, bbn_epsilon=0.2)
    with counted_host_syncs() as counts:
        stats = svb.apply()
    assert stats.certified == 6 and stats.bn_clipped > 0
    assert sum(counts.values()) == 1 and counts["tolist"] == 1, counts


def test_host_syncs_per_apply_do_not_grow_with_the_number_of_layers():
    """A stack with layers for the solver costs a fixed number of host reads, however many layers it
    holds: a per-layer .item() (or mask, or bool()) added to the engine fails this test."""
    seen = []
    for out_of_band in (2, 6):
        svb = SVB(stack_net(out_of_band, 3), epsilon=0.5, bbn_epsilon=0.2)
        with counted_host_syncs() as counts:
            stats = svb.apply()
        assert stats.clipped > 0 and stats.certified == 4
        seen.append(dict(counts))
    assert seen[0] == seen[1] and sum(seen[0].values()) <= 5, seen


def test_sync_counter_sees_a_per_layer_read(monkeypatch):
    """The counter itself: an engine that read one value per layer would be caught."""
    real = SVB._matrices

    def reading(self, i):
        matrices = real(self, i)
        float(matrices.abs().max())
        return matrices

    monkeypatch.setattr(SVB, "_matrices", reading)
    for layers in (2, 6):
        with counted_host_syncs() as counts:
            SVB(stack_net(0, layers)).apply()
        assert counts["__float__"] == layers + 1


def test_cpu_factorises_only_what_can_be_certified_and_decides_as_the_gpu_path(monkeypatch):
    """On the CPU the certificate skips the Cholesky factorisations of matrices visibly outside the band
    (a diagonal entry of the Gram below lo^2, or a power-iteration Rayleigh quotient above hi^2): the
    decisions are those of the GPU path (every matrix factorised), and He-initialised layers are skipped."""
    rng = np.random.default_rng(50)
    mats = [with_spectrum(64, 576, 0.8, 1.2, rng) for _ in range(3)]  # in band: certified
    mats += [with_spectrum(64, 576, 0.9, 1.6, rng), with_spectrum(64, 576, 0.5, 1.2, rng)]  # one edge out
    mats += [with_spectrum(64, 576, LO * 1.001, HI * 0.999, rng)]  # in band, near both edges: still proved
    # timm's He init (normal, fan-out) of a 3x3 conv with 64 channels in and out, as in WRN-28-10
    he = rng.standard_normal((4, 64, 576)) * math.sqrt(2 / (64 * 9))
    stack = torch.from_numpy(np.concatenate([np.stack(mats), he])).float()
    factorised = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda m: factorised.append(len(m) // 2) or real(m))
    on_cpu = certify_in_band(stack, 0.5)
    monkeypatch.setattr(solver, "_skips_hopeless", lambda device: False)
    every = certify_in_band(stack, 0.5)
    assert torch.equal(on_cpu, every)
    assert on_cpu.tolist() == [True] * 3 + [False] * 2 + [True] + [False] * 4
    assert factorised[-1] == len(stack)  # the GPU path factorised all 10
    assert factorised[0] <= 6  # the CPU path skipped the He matrices and what else it could see
    hopeless = solver._beyond_an_edge(solver._gram([solver._oriented(stack)])[0], LO**2, HI**2)
    assert not hopeless[[0, 1, 2, 5]].any() and hopeless[6:].all()  # never in-band matrices; He init always
