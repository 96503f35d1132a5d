"""The certificate and the solver behind :mod:`timm_svb.functional` and the :class:`timm_svb.SVB` plugin.

Private: names here may change without notice; the public math is :mod:`timm_svb.functional`. Everything
works on band edges ``[lo, hi]`` (the caller maps ``epsilon`` to them with :func:`timm_svb.functional.band`)
and on oriented stacks (:func:`_oriented`: compute dtype, smaller side first). The plugin calls the pieces
one by one to batch layers and keep host syncs few: :func:`_full_precision` around everything,
:func:`_certify_parts` (Gram and certificate, no sync), then :func:`_solve` for what the certificate left.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# The routes a matrix can take, cheapest first, by the dtype of the weights' computation: (dtype the Gram is
# formed in, dtype of its eigendecomposition, largest condition number s_max / s_min the route takes). The
# Gram squares the condition number, so the relative error of the smallest singular values grows as cond^2:
# about 8e-7 * cond^2 for a float32 eigh of the float32 Gram, 4e-8 * cond^2 when that Gram's eigh is solved
# in float64 (the float32 eigh is most of the error), 3e-17 * cond^2 for the float64 Gram. Each limit keeps
# it under 5e-6, a quarter of functional.BAND_SLACK, so a value bounded a moment ago reads back in band.
# Measured at the limits from 64 x 576 to 1024 x 9216: singular values to 3.6e-6 and clipped values within
# 4.6e-6 of the band edge at 2.45, 3.3e-6 and 4.2e-6 at 9.9; the float64 Gram to 3.5e-7 at 1e5 (3.5e-11 at
# 1e3, its limit for float64 weights, whose slack is 1e-10).
# tests/test_functional.py::test_route_accuracy_at_its_limit checks this, test_route_limits_are_pinned the
# limits from both sides. Weights bounded with epsilon <= 0.58 have condition numbers <= 2.5 and take the
# first route. Beyond the last route, or for rank-deficient matrices, a float64 SVD is used.
_ROUTES = {
    torch.float32: (
        (torch.float32, torch.float32, 2.5),
        (torch.float32, torch.float64, 10.0),
        (torch.float64, torch.float64, 1e5),
    ),
    torch.float64: ((torch.float64, torch.float64, 1e3),),
}
_GRAM64_COND_LIMIT = _ROUTES[torch.float32][-1][2]

# The float32 route rescales clipped directions by clip(s)/s; keep those factors far from float32's range
# limits (weights whose singular values are below ~1e-30 or above ~1e30 take the float64 route instead).
_FLOAT32_FACTOR_LIMIT = 1e30


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _outside(values: torch.Tensor, lo: float, hi: float, slack: float) -> torch.Tensor:
    """Mask of ``values`` outside ``[lo, hi]`` by more than the relative ``slack``."""
    return (values < lo * (1 - slack)) | (values > hi * (1 + slack))


# (backend, op) pairs of torch's per-backend fp32 precision settings (torch >= 2.9) that reach float32
# matmuls; torch.set_float32_matmul_precision (the legacy API) sets both.
_MATMUL_PRECISION_KEYS = (("cuda", "matmul"), ("mkldnn", "matmul"))


def _precision_api() -> tuple | None:
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    setter = getattr(torch._C, "_set_fp32_precision_setter", None)
    return None if getter is None or setter is None else (getter, setter)


def _set_precision_value(backend: str, op: str) -> str:
    """The value set for ``(backend, op)``: ``"none"`` where it inherits from its parent.

    torch's getter answers with the inherited value, so the parent (``(backend, "all")``, then
    ``("generic", "all")``) is changed for a moment to see whether the value follows it.
    """
    get, set_ = _precision_api()
    value = get(backend, op)
    if backend == "generic" or value == "none":
        return value  # generic has no parent; "none" means nothing was resolved anywhere
    parent = ("generic", "all") if op == "all" else (backend, "all")
    saved = _set_precision_value(*parent)
    set_(*parent, "ieee" if value != "ieee" else "tf32")
    follows = get(backend, op) != value
    set_(*parent, saved)
    return "none" if follows else value


@contextmanager
def _full_precision() -> Iterator[None]:
    """IEEE float32 matmuls and no autocast to 16 bits, whatever the user set; restored exactly afterwards.

    The Gram route squares singular values, so it needs every bit a training loop may have traded for speed:
    TF32 on CUDA, bf16 on oneDNN (``torch.backends.fp32_precision``,
    ``torch.backends.cuda.matmul.fp32_precision``, ``torch.backends.mkldnn.matmul.fp32_precision``) or the
    legacy ``torch.set_float32_matmul_precision`` / ``torch.backends.cuda.matmul.allow_tf32``.
    """
    api = _precision_api()
    saved = {key: _set_precision_value(*key) for key in _MATMUL_PRECISION_KEYS} if api else {}
    for key in saved:
        api[1](*key, "ieee")
    # readable now: with both matmul settings at "ieee" the legacy getter sees no mix of the two APIs
    legacy = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(legacy)
        for key, value in saved.items():
            api[1](*key, value)


def _eigh(gram: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a ``(B, p, p)`` stack, solved in ``dtype``."""
    gram = gram.to(dtype)
    if gram.device.type == "cpu" and gram.shape[0] > 1:
        # torch's batched eigh on the CPU is more than 10x slower than a loop over the batch
        # (benchmarks/svb_speed.py); on GPUs the batched solver is the fast one.
        pairs = [torch.linalg.eigh(g) for g in gram]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return torch.linalg.eigh(gram)


# ------------------------------------------------------------------ the Gram matrix and the certificate

# The Gram matrix is summed over chunks of at most this many columns (one product per chunk, then the sum
# of the chunks), so that each product in an entry passes through at most chunk + chunks + 1 roundings
# instead of n: the certificate's rounding margin (below) shrinks by ~n / (2 sqrt(n)), e.g. from 0.24 to
# 0.011 (in s^2) for WRN-28-10's widest conv, 640 x 5760 (24 chunks of 240 columns).
_GRAM_CHUNK = 256
# Only the lower triangle is formed, by blocks of rows (block i times rows 0..end of block i): k blocks
# cost (k + 1) / 2k of the full product, 0.625 for 640 rows in 4 blocks.
_GRAM_MIN_ROWS = 128


def _batched_gram(device: torch.device) -> bool:
    """Whether :func:`_gram` stacks the parts and multiplies all chunks at once (GPUs: few launches) rather
    than accumulating chunk by chunk without copying the weights (CPU). Tests run both on the CPU."""
    return device.type != "cpu"


def _gram(parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The Gram matrices ``X X^T`` of ``(g_i, p, n)`` stacks (concatenated: ``(sum g_i, p, p)``) in the
    parts' dtype, and the rounding depth ``d`` of every entry. Only the lower triangle is meaningful (the
    strict upper holds zeros or near-copies): it is all that Cholesky and ``eigh`` (``UPLO="L"``) read,
    tests/test_svb_certificate.py::test_solvers_read_only_the_lower_triangle.

    Each entry is a dot product over chunks of at most :data:`_GRAM_CHUNK` columns, the chunks summed
    afterwards, so every product in it is rounded at most ``d = chunk width + chunks + 1`` times (any
    summation order within a chunk or over the chunks): ``|G_computed - G| <= gamma_d |X| |X|^T`` entrywise
    (Higham, Accuracy and Stability, 3.5), with ``gamma_d = d u / (1 - d u)``. On the CPU each part is
    accumulated chunk by chunk (no copy of the weights); on GPUs the parts are stacked once and all chunks
    multiplied in one batched product per row block (few kernel launches).
    """
    p, n = parts[0].shape[-2:]
    chunks = -(-n // _GRAM_CHUNK)
    width = -(-n // chunks)
    rows = max(_GRAM_MIN_ROWS, -(-p // 4))
    gram = parts[0].new_zeros(sum(part.shape[0] for part in parts), p, p)
    if not _batched_gram(parts[0].device):
        start = 0
        for part in parts:
            out = gram[start : start + part.shape[0]]
            start += part.shape[0]
            for r0 in range(0, p, rows):
                r1 = min(p, r0 + rows)
                block = None
                for c0 in range(0, n, width):
                    left, right = part[:, r0:r1, c0 : c0 + width], part[:, :r1, c0 : c0 + width].mT
                    block = torch.bmm(left, right) if block is None else block.baddbmm_(left, right)
                out[:, r0:r1, :r1] = block
    else:
        x = torch.cat(list(parts)) if len(parts) > 1 else parts[0]
        x = nn.functional.pad(x, (0, chunks * width - n)) if chunks * width != n else x
        x = x.reshape(x.shape[0], p, chunks, width).transpose(1, 2).contiguous()  # (B, chunks, p, width)
        for r0 in range(0, p, rows):
            r1 = min(p, r0 + rows)
            gram[:, r0:r1, :r1] = torch.matmul(x[:, :, r0:r1], x[:, :, :r1].mT).sum(1)
    return gram, width + chunks + 1


def _gamma(k: int, unit_roundoff: float) -> float:
    return k * unit_roundoff / (1 - k * unit_roundoff)


def _certificate_margin(trace: torch.Tensor, p: int, n: int, depth: int, hi2: float, dtype: torch.dtype):
    """A bound (in units of s^2, per matrix) on every rounding error between the exact Gram ``G = X X^T``
    and the float64 Cholesky factorisations that :func:`_certify` runs on the computed Gram shifted by
    the band edges. If the factorisation of ``(hi2 - margin) I - G_computed`` succeeds, the exact
    ``hi2 I - G`` is positive semi-definite (likewise at the lower edge); the derivation:

    - Gram (:func:`_gram`): ``||G_computed - G||_2 <= gamma_d || |X| |X|^T ||_2 <= gamma_d ||X||_F^2``
      ``<= gamma_d / (1 - gamma_d) tr(G_computed)`` (u of the Gram's dtype), plus ``p n`` times the
      smallest subnormal for products that underflow.
    - Shift: the diagonal ``c - G_ii`` is rounded once in float64 (and ``c`` itself): at most
      ``2 u64 (hi2 + tr(G_computed))``.
    - Cholesky (Higham, Theorem 10.3): a factorisation ``R`` that runs to completion on ``M`` satisfies
      ``R^T R = M + dM`` with ``|dM| <= gamma_{p+1} |R^T| |R|``, so
      ``||dM||_2 <= gamma_{p+1} ||R||_F^2 <= gamma_{p+1} / (1 - gamma_{p+1}) tr(M)`` and
      ``tr(M) <= p hi2 + tr(G_computed)`` for both shifted matrices; since ``R^T R`` is PSD,
      ``lambda_min(M) >= -||dM||_2``. (This holds for any order of the inner products, so for LAPACK's and
      cuSOLVER's blocked algorithms with conventional matrix products.)

    The sum is enlarged by 1% to cover the rounding of this evaluation (relative errors ~1e-15). For
    WRN-28-10's widest conv (640 x 5760, s ~ 1) it is 0.0106 in s^2, so a matrix is certified when its
    singular values lie within ``[lo (1 + 1.2%), hi (1 - 0.24%)]``; the others go to the solver, which
    decides by its own estimates (to ~5e-6).
    """
    unit = torch.finfo(dtype).eps / 2
    u64 = torch.finfo(torch.float64).eps / 2
    gram_error = _gamma(depth, unit) / (1 - _gamma(depth, unit)) * trace
    gram_error = gram_error + p * n * torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    chol_error = _gamma(p + 1, u64) / (1 - _gamma(p + 1, u64)) * (p * hi2 + trace)
    shift_error = 2 * u64 * (hi2 + trace)
    return 1.01 * (gram_error + chol_error + shift_error)


def _skips_hopeless(device: torch.device) -> bool:
    """Whether :func:`_certify` reads on the host which matrices are worth factorising (CPU: a read costs
    nothing) rather than factorising all without a sync (GPUs). Tests run both on the CPU."""
    return device.type == "cpu"


def _beyond_an_edge(gram: torch.Tensor, lo2: float, hi2: float, iterations: int = 4) -> torch.Tensor:
    """``(B,)`` True where the Gram (lower triangle) visibly has an eigenvalue outside ``[lo2, hi2]``: a
    diagonal entry below ``lo2`` (``lambda_min <= G_ii``), or a Rayleigh quotient above ``hi2``
    (``lambda_max >= v^T G v / v^T v``) after a few power iterations from the column of the largest
    diagonal entry. Such a matrix cannot be certified, so its Cholesky factorisations can be skipped; a
    wrong True would only send a matrix to the solver, which decides by itself (never a wrong result)."""
    lower = gram.tril()
    diag = gram.diagonal(dim1=-2, dim2=-1)

    def times(v: torch.Tensor) -> torch.Tensor:  # G v with G = L + L^T - diag(L)
        return lower @ v + lower.mT @ v - diag.unsqueeze(-1) * v

    start = diag.argmax(-1)
    v = torch.zeros_like(diag).scatter_(-1, start.unsqueeze(-1), 1.0).unsqueeze(-1)
    for _ in range(iterations):
        v = times(v)
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    rayleigh = (v * times(v)).sum((-2, -1))
    return (diag.amin(-1) < lo2) | (rayleigh > hi2)


def _certify(gram: torch.Tensor, depth: int, n: int, lo: float, hi: float) -> torch.Tensor:
    """``(B,)`` True where all singular values of the matrix whose :func:`_gram` is ``gram`` (``n``
    columns) are proved to lie in ``[lo, hi]``: one batched float64 Cholesky of ``hi^2 I - G`` and
    ``G - lo^2 I``, each shifted inwards by :func:`_certificate_margin`. No host sync on GPUs; on the CPU
    (:func:`_skips_hopeless`) matrices that :func:`_beyond_an_edge` shows outside the band are not
    factorised: the certificate costs next to nothing where it cannot help (freshly initialised weights)."""
    batch = gram.shape[0]
    if _skips_hopeless(gram.device):
        hopeful = (~_beyond_an_edge(gram, lo * lo, hi * hi)).nonzero().flatten()
        if len(hopeful) < batch:
            certified = torch.zeros(batch, dtype=torch.bool)
            if len(hopeful):
                certified[hopeful] = _cholesky_certificate(gram[hopeful], depth, n, lo, hi)
            return certified
    return _cholesky_certificate(gram, depth, n, lo, hi)


def _cholesky_certificate(gram: torch.Tensor, depth: int, n: int, lo: float, hi: float) -> torch.Tensor:
    """:func:`_certify` without the skipping: the two factorisations of every matrix."""
    batch, p = gram.shape[0], gram.shape[-1]
    lo2, hi2 = lo * lo, hi * hi
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1, dtype=torch.float64)
    margin = _certificate_margin(trace, p, n, depth, hi2, gram.dtype)
    shifted = gram.new_empty((2 * batch, p, p), dtype=torch.float64)
    shifted[:batch], shifted[batch:] = gram, gram
    shifted[:batch].neg_()
    shifted.diagonal(dim1=-2, dim2=-1).add_(torch.cat([hi2 - margin, -(lo2 + margin)]).unsqueeze(-1))
    info = torch.linalg.cholesky_ex(shifted).info
    return (info[:batch] == 0) & (info[batch:] == 0) & torch.isfinite(trace)


def _certify_parts(
    parts: Sequence[torch.Tensor], lo: float, hi: float, slack: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The certificate for ``(g_i, p, n)`` stacks of oriented matrices (``p <= n``, in the compute dtype)
    and the band ``[lo, hi]`` widened by the relative ``slack``: ``(certified (sum g_i,) bool, their Gram
    matrices)``, the Gram kept for the solver. No host sync."""
    gram, depth = _gram(parts)
    return _certify(gram, depth, parts[0].shape[-1], lo * (1 - slack), hi * (1 + slack)), gram


def _oriented(matrices: torch.Tensor) -> torch.Tensor:
    """The stack in the compute dtype with its smaller side first (a view where possible)."""
    a = matrices.to(_compute_dtype(matrices.dtype))
    return a.mT if a.shape[-2] > a.shape[-1] else a


# ------------------------------------------------------------------ the solver

# Matrices whose largest |entry| is within this factor of 1 are used as they are (their Gram is far from
# float32's range limits); others are first divided by a power of two, which is exact, so that the Gram of
# weights around 1e-24 or 1e20 neither under- nor overflows.
_UNSCALED_RANGE = 2.0**40


def _scale(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B,)`` powers of two to divide the matrices of ``a`` by (1 unless of extreme magnitude; 1 for zero
    and non-finite matrices), and their largest ``|entry|`` (NaN/Inf for non-finite ones)."""
    low, high = torch.aminmax(a.flatten(1), dim=1)
    amax = torch.maximum(-low, high)
    in_range = (amax >= 1 / _UNSCALED_RANGE) & (amax <= _UNSCALED_RANGE)
    power = torch.ldexp(torch.ones_like(amax), torch.frexp(amax)[1])
    return torch.where(in_range | ~torch.isfinite(amax) | (amax == 0), 1.0, power), amax


@dataclass
class _Solved:
    """What :func:`_solve` did to a ``(B, p, n)`` stack: device tensors, and the rows it rewrote (host)."""

    matrices: torch.Tensor  # the input itself where nothing changed
    sv: torch.Tensor  # (B, p) float64 ascending; 0 for zero matrices, NaN for non-finite ones
    num_clipped: torch.Tensor
    fallback: torch.Tensor
    degenerate: torch.Tensor
    nonfinite: torch.Tensor  # NaN/Inf in the input (or, never seen, in a bounded result): left unchanged
    changed: list[int]


def _solve(a: torch.Tensor, gram: torch.Tensor | None, lo: float, hi: float, slack: float) -> _Solved:
    """Clip the singular values of an oriented ``(B, p, n)`` stack (``p <= n``, compute dtype) to
    ``[lo, hi]`` (those outside it by more than the relative ``slack``) by the routes of ``_ROUTES``;
    ``gram`` is :func:`_gram` of ``a`` if already formed.

    Host decisions are made once per stack and route (one small transfer each), never per matrix.
    """
    batch, p, device = a.shape[0], a.shape[-2], a.device
    if gram is None:
        gram = _gram([a])[0]
    # Rows whose Gram diagonal (squared row norms) is finite and far from the dtype's range limits are used
    # as they are; the others (zero, non-finite or extreme weights, rare) are looked at entry by entry.
    largest = gram.diagonal(dim1=-2, dim2=-1).amax(-1)
    plain = ((largest >= _UNSCALED_RANGE**-2) & (largest <= _UNSCALED_RANGE**2)).tolist()  # host decision
    scale = torch.ones(batch, dtype=a.dtype, device=device)
    finite = torch.ones(batch, dtype=torch.bool, device=device)
    degenerate = torch.zeros(batch, dtype=torch.bool, device=device)
    todo = [i for i in range(batch) if plain[i]]
    odd = [i for i in range(batch) if not plain[i]]
    if odd:
        where = _index(odd, device)
        scale[where], amax = _scale(_take(a, odd))
        finite[where], degenerate[where] = torch.isfinite(amax), amax == 0
        usable = (torch.isfinite(amax) & (amax != 0)).tolist()
        todo = sorted(todo + [i for i, ok in zip(odd, usable, strict=True) if ok])
    sv = torch.full((batch, p), math.nan, dtype=torch.float64, device=device)
    sv.masked_fill_(degenerate[:, None], 0.0)
    num_clipped = torch.zeros(batch, dtype=torch.int64, device=device)
    fallback = torch.zeros(batch, dtype=torch.bool, device=device)
    nonfinite = ~finite
    out, changed = a, []
    x, factors = _take(a, todo), _take(scale, todo)
    rescaled = any(not plain[i] for i in todo)
    if rescaled:
        x, gram = x / factors[:, None, None], None
    else:
        gram = _take(gram, todo)
    for gram_dtype, eigh_dtype, cond_limit in _ROUTES[a.dtype]:
        if not todo:
            break
        if gram is None or gram.dtype != gram_dtype:
            gram = _gram([x.to(gram_dtype)])[0]
        eigvals, u = _eigh(gram, eigh_dtype)
        s = eigvals.clamp_min(0).sqrt()
        true_s = s.double() * factors[:, None].double()
        # Decide the route on the Gram's own estimate: its error blurs s_min only for condition numbers far
        # beyond the limit, so an ill-conditioned matrix is never taken for a well-conditioned one.
        # Non-finite or zero s_min fails the test and moves on.
        ok = s[:, -1] <= cond_limit * s[:, 0]
        if gram_dtype == torch.float32:
            ok &= (true_s[:, 0] * _FLOAT32_FACTOR_LIMIT >= hi) & (true_s[:, -1] <= lo * _FLOAT32_FACTOR_LIMIT)
        clipped = _outside(true_s, lo, hi, slack) & ok[:, None]
        ends = [clipped.int().cumprod(-1).sum(-1), clipped.flip(-1).int().cumprod(-1).sum(-1)]
        summary = torch.stack([ok.long(), clipped.sum(-1), *ends], -1).tolist()  # one transfer per route
        done = [j for j, row in enumerate(summary) if row[0]]
        if done:
            where = _index([todo[j] for j in done], device)
            sv[where] = _take(true_s, done)
            num_clipped[where] = _take(clipped, done).sum(-1)
            fallback[where] = gram_dtype == torch.float64
        moved = [j for j in done if summary[j][1]]
        if moved:
            s_moved, u_moved = _take(true_s, moved), _take(u, moved).to(gram_dtype)
            factor = torch.where(_take(clipped, moved), s_moved.clamp(lo, hi) / s_moved, 1.0)
            n_low, n_high = (max(summary[j][k] for j in moved) for k in (2, 3))
            new = _rebuild(_take(x, moved).to(gram_dtype), u_moved, factor.to(gram_dtype), n_low, n_high)
            if rescaled:
                new = new * _take(factors, moved)[:, None, None].to(gram_dtype)
            rows = [todo[j] for j in moved]
            # a finite input gives a finite result when the solver's output is finite (checked cheaply)
            nonfinite[_index(rows, device)] |= ~(
                torch.isfinite(u_moved).flatten(1).all(1) & factor.isfinite().all(1)
            )
            out = _put(out, a, rows, new.to(a.dtype))
            changed += rows
        left = [j for j, row in enumerate(summary) if not row[0]]
        todo, x, factors, gram = (
            [todo[j] for j in left],
            _take(x, left),
            _take(factors, left),
            _take(gram, left),
        )
    if todo:
        exact, s64 = _svd_clip(_take(a, todo), lo, hi)
        n64 = _outside(s64, lo, hi, slack).sum(-1)
        where = _index(todo, device)
        sv[where], fallback[where], num_clipped[where] = s64, True, n64
        moved = [j for j, n in enumerate(n64.tolist()) if n]
        if moved:
            new, rows = _take(exact, moved).to(a.dtype), [todo[j] for j in moved]
            nonfinite[_index(rows, device)] |= ~torch.isfinite(new).flatten(1).all(1)
            out = _put(out, a, rows, new)
            changed += rows
    return _Solved(out, sv, num_clipped, fallback, degenerate, nonfinite, sorted(changed))


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _take(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows ``rows`` of ``t``: ``t`` itself, not a copy, when that is all of them in order."""
    return t if rows == list(range(len(t))) else t[_index(rows, t.device)]


def _put(out: torch.Tensor, a: torch.Tensor, rows: list[int], new: torch.Tensor) -> torch.Tensor:
    """``out`` (``a`` until the first write, then a copy of it) with ``new`` in ``rows``."""
    if out is a and rows == list(range(len(a))):
        return new
    out = out.clone() if out is a else out
    out[_index(rows, out.device)] = new
    return out


def _svd_clip(a: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference route: float64 SVD, clip, rebuild. Returns (bounded float64 matrices, singular values
    ascending)."""
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return (u * s.clamp(lo, hi).unsqueeze(-2)) @ vh, s.flip(-1)


def _rebuild(a: torch.Tensor, u: torch.Tensor, factor: torch.Tensor, n_low: int, n_high: int) -> torch.Tensor:
    """``A + U_c diag(factor_c - 1) U_c^T A`` over the clipped directions only (``factor`` is 1 elsewhere).

    eigh sorts ascending, so the clipped directions are a prefix (too small, at most ``n_low`` of them)
    and a suffix (too large, at most ``n_high``) of ``u``'s columns; the widest prefix and suffix over the
    stack keep it one batched product, with ``factor - 1 = 0`` for columns that are not clipped in a given
    matrix. Within a route's condition limit the shrinking factors are >= ~0.1, so the thin form loses no
    accuracy to cancellation.
    """
    p = u.shape[-1]
    if n_low + n_high >= p // 2:
        # Many directions: one p x p operator U diag(factor) U^T beats two thin products (and, unlike
        # A + U diag(factor - 1) U^T A, does not cancel A away when every direction shrinks a lot).
        return ((u * factor.unsqueeze(-2)) @ u.mT) @ a
    cols = torch.cat([torch.arange(n_low), torch.arange(p - n_high, p)]).to(u.device)
    u_c = u[..., cols]
    scale = (factor[..., cols] - 1).unsqueeze(-1)
    return torch.baddbmm(a, u_c, scale * (u_c.mT @ a))
