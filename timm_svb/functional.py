"""The math of SVB and BBN as pure functions (Jia et al., CVPR 2017, Algorithms 1 and 2).

Nothing here holds state or walks a model except :func:`orthogonal_init_`; the :class:`timm_svb.SVB`
plugin batches layers and calls the certificate, the solver and :func:`bbn_gamma`.

Most matrices need no solver: all singular values of ``A`` lie in ``[lo, hi]`` iff ``hi^2 I - A A^T`` and
``A A^T - lo^2 I`` are positive semi-definite, which one batched Cholesky factorisation decides
(:func:`certify_in_band`), with a margin that bounds every rounding error so that it never certifies a
matrix outside the band.

The fast route for clipping the singular values of a stack of ``m x n`` matrices ``A`` (``m <= n``; tall
matrices are transposed) is the eigendecomposition of the small Gram matrix ``G = A A^T = U diag(s^2) U^T``.
Since ``A = U diag(s) V^T``, the bounded matrix is ``U diag(clip(s)) V^T = U diag(clip(s)/s) U^T A``, so
``V`` is never formed and only clipped directions need rebuilding:
``A' = A + U_c diag(clip(s_c)/s_c - 1) U_c^T A``. Squaring the singular values costs precision, so each
matrix takes the cheapest route that resolves its condition number: the float32 Gram (its eigendecomposition
in float32 or float64), the float64 Gram, or a float64 SVD.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BAND_SLACK",
    "BoundResult",
    "band",
    "band_slack",
    "bbn_alpha",
    "bbn_gamma",
    "bbn_ratio",
    "certify_in_band",
    "check_epsilon",
    "clip_singular_values",
    "matrices_to_weight",
    "orthogonal_init_",
    "outside_band",
    "singular_values",
    "weight_matrices",
]

# The routes a matrix can take, cheapest first, by the dtype of the weights' computation: (dtype the Gram is
# formed in, dtype of its eigendecomposition, largest condition number s_max / s_min the route takes). The
# Gram squares the condition number, so the relative error of the smallest singular values grows as cond^2:
# about 8e-7 * cond^2 for a float32 eigh of the float32 Gram, 4e-8 * cond^2 when that Gram's eigh is solved
# in float64 (the float32 eigh is most of the error), 3e-17 * cond^2 for the float64 Gram. Each limit keeps
# it under 5e-6, a quarter of BAND_SLACK, so a value bounded a moment ago reads back in band. Measured at the
# limits from 64 x 576 to 1024 x 9216: singular values to 3.6e-6 and clipped values within 4.6e-6 of the band
# edge at 2.45, 3.3e-6 and 4.2e-6 at 9.9; the float64 Gram to 3.5e-7 at 1e5 (3.5e-11 at 1e3, its limit for
# float64 weights, whose slack is 1e-10). tests/test_functional.py::test_route_accuracy_at_its_limit checks
# this, test_route_limits_are_pinned the limits from both sides. Weights bounded with epsilon <= 0.58 have
# condition numbers <= 2.5 and take the first route. Beyond the last route, or for rank-deficient matrices,
# a float64 SVD is used.
_ROUTES = {
    torch.float32: (
        (torch.float32, torch.float32, 2.5),
        (torch.float32, torch.float64, 10.0),
        (torch.float64, torch.float64, 1e5),
    ),
    torch.float64: ((torch.float64, torch.float64, 1e3),),
}
_GRAM64_COND_LIMIT = _ROUTES[torch.float32][-1][2]

# Relative slack around the band within which a singular value counts as in band, by the weight's dtype: a
# matrix is rewritten only if some value is outside the band by more than this. float32: a few times the
# Gram routes' error above (a matrix bounded a moment ago reads back as in band, bit for bit unchanged).
# bf16/fp16: the bounded matrix is computed in float32 and rounded to the weight's dtype, which moves its
# singular values by up to ~0.6 unit roundoff (0.3 machine epsilon; measured from 1 x 30 to 640 x 5760,
# tests/test_functional.py::test_half_precision_results_settle); a slack of one machine epsilon keeps a
# second apply from rewriting what the first wrote.
BAND_SLACK = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float16: torch.finfo(torch.float16).eps,
}

# The float32 route rescales clipped directions by clip(s)/s; keep those factors far from float32's range
# limits (weights whose singular values are below ~1e-30 or above ~1e30 take the float64 route instead).
_FLOAT32_FACTOR_LIMIT = 1e30


def check_epsilon(value: float, name: str) -> float:
    """Return ``value`` as a float if it is a finite number > 0, else raise a ``ValueError`` naming it."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def band(epsilon: float) -> tuple[float, float]:
    """The SVB band ``[1/(1+epsilon), 1+epsilon]`` for singular values (or BBN ratios)."""
    factor = 1.0 + check_epsilon(epsilon, "epsilon")
    return 1.0 / factor, factor


def band_slack(dtype: torch.dtype) -> float:
    """The relative in-band slack (:data:`BAND_SLACK`) for weights of ``dtype`` (float32's for others)."""
    return BAND_SLACK.get(dtype, BAND_SLACK[torch.float32])


def outside_band(
    values: torch.Tensor, epsilon: float, slack: float = BAND_SLACK[torch.float32]
) -> torch.Tensor:
    """Mask of the singular values outside ``[1/(1+epsilon), 1+epsilon]``, with a relative ``slack``.

    The default slack is what float32 weights that SVB bounded to a band edge read back as.
    """
    lo, hi = band(epsilon)
    return (values < lo * (1 - slack)) | (values > hi * (1 + slack))


def weight_matrices(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """View a conv or linear weight as ``groups`` matrices of shape ``(out/groups, in/groups * prod(k))``.

    A linear weight ``out x in`` is one matrix; a conv weight ``out x in/groups x k...`` (Conv1d/2d/3d) is
    one per group, which is the same as the block-diagonal matrix of the whole layer. A weight that is not
    contiguous (channels_last, a transposed view) gives a copy.
    """
    if weight.dim() < 2:
        raise ValueError(f"expected a conv or linear weight with >= 2 dims, got shape {tuple(weight.shape)}")
    out_channels = weight.shape[0]
    if groups < 1 or out_channels % groups:
        raise ValueError(f"out channels {out_channels} are not divisible by groups={groups}")
    return weight.reshape(groups, out_channels // groups, -1)


def matrices_to_weight(matrices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_matrices`: reshape ``(groups, m, n)`` back to ``like``'s shape and dtype."""
    return matrices.reshape(like.shape).to(dtype=like.dtype)


@dataclass
class BoundResult:
    """What :func:`clip_singular_values` did to a stack of ``B`` matrices.

    Attributes:
        matrices: the bounded matrices, same shape as the input, in the compute dtype (float32 or float64).
        sv_min: ``(B,)`` smallest singular value of each input matrix (float64).
        sv_max: ``(B,)`` largest singular value of each input matrix (float64).
        num_clipped: ``(B,)`` number of singular values outside the band (by more than the slack), each
            moved to the band edge; 0 exactly where the matrix is returned unchanged.
        fallback: ``(B,)`` True where a float64 route (Gram or SVD) was used.
        degenerate: ``(B,)`` True for all-zero matrices, which have no directions to bound and are returned
            unchanged.
        certified: ``(B,)`` True where the certificate proved every singular value in band, so no solver
            ran: returned unchanged, ``sv_min``/``sv_max`` NaN (not computed).
        nonfinite: ``(B,)`` True for matrices holding NaN/Inf, returned unchanged (``sv_min``/``sv_max``
            NaN).
    """

    matrices: torch.Tensor
    sv_min: torch.Tensor
    sv_max: torch.Tensor
    num_clipped: torch.Tensor
    fallback: torch.Tensor
    degenerate: torch.Tensor
    certified: torch.Tensor
    nonfinite: torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    parts: Sequence[torch.Tensor], epsilon: float, slack: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The certificate for ``(g_i, p, n)`` stacks of oriented matrices (``p <= n``, in the compute dtype):
    ``(certified (sum g_i,) bool, their Gram matrices)``, the Gram kept for the solver. No host sync."""
    lo, hi = band(epsilon)
    gram, depth = _gram(parts)
    return _certify(gram, depth, parts[0].shape[-1], lo * (1 - slack), hi * (1 + slack)), gram


def certify_in_band(matrices: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``(B,)`` True where every singular value of a matrix in the ``(B, m, n)`` stack is proved, despite
    rounding, to lie in ``[1/(1+epsilon), 1+epsilon]`` to within :func:`band_slack` of its dtype.

    A certificate, not an estimate: positive definiteness of ``hi^2 I - A A^T`` and ``A A^T - lo^2 I``
    (smaller side), decided by one batched Cholesky with a margin that bounds every rounding error (see
    ``_certificate_margin``). False can also mean "too close to an edge to tell"; True is never wrong.
    """
    if matrices.dim() != 3:
        raise ValueError(f"expected a (B, m, n) stack of matrices, got shape {tuple(matrices.shape)}")
    with _full_precision():
        return _certify_parts([_oriented(matrices)], epsilon, band_slack(matrices.dtype))[0]


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


def _solve(a: torch.Tensor, gram: torch.Tensor | None, epsilon: float, slack: float) -> _Solved:
    """Clip the singular values of an oriented ``(B, p, n)`` stack (``p <= n``, compute dtype) by the
    routes of ``_ROUTES``; ``gram`` is :func:`_gram` of ``a`` if already formed.

    Host decisions are made once per stack and route (one small transfer each), never per matrix.
    """
    lo, hi = band(epsilon)
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
        clipped = outside_band(true_s, epsilon, slack) & ok[:, None]
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
        n64 = outside_band(s64, epsilon, slack).sum(-1)
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


def clip_singular_values(matrices: torch.Tensor, epsilon: float, *, certify: bool = True) -> BoundResult:
    """Clip every singular value of each matrix in a ``(B, m, n)`` stack to ``[1/(1+eps), 1+eps]``.

    Singular vectors are kept. With ``certify`` (default) the test of :func:`certify_in_band` comes first:
    matrices it proves in band are returned bit for bit unchanged, ``certified``, without a solver and so
    without singular values (``sv_min``/``sv_max`` NaN). The others take the cheapest route that resolves
    their condition number (see ``_ROUTES``): the Gram matrix of the smaller side with a float32 or float64
    eigendecomposition, the float64 Gram, or a float64 SVD for matrices beyond that or rank-deficient;
    computed in float32 (float64 for float64 input), weights of extreme magnitude scaled by a power of two
    first. A matrix is rewritten only if a singular value is outside the band by more than
    :func:`band_slack` of the input dtype; then every such value is set to the band edge (to within 5e-6
    relative). Matrices with nothing to clip, all-zero matrices (``degenerate``) and matrices holding
    NaN/Inf (``nonfinite``) are returned bit for bit unchanged (when none changes, ``matrices`` may be the
    input tensor itself).
    """
    if matrices.dim() != 3:
        raise ValueError(f"expected a (B, m, n) stack of matrices, got shape {tuple(matrices.shape)}")
    with _full_precision():
        a = _oriented(matrices)
        slack = band_slack(matrices.dtype)
        batch, device = a.shape[0], a.device
        certified, gram = torch.zeros(batch, dtype=torch.bool, device=device), None
        if certify:
            certified, gram = _certify_parts([a], epsilon, slack)
        result = BoundResult(
            matrices=a,
            sv_min=torch.full((batch,), math.nan, dtype=torch.float64, device=device),
            sv_max=torch.full((batch,), math.nan, dtype=torch.float64, device=device),
            num_clipped=torch.zeros(batch, dtype=torch.int64, device=device),
            fallback=torch.zeros(batch, dtype=torch.bool, device=device),
            degenerate=torch.zeros(batch, dtype=torch.bool, device=device),
            certified=certified,
            nonfinite=torch.zeros(batch, dtype=torch.bool, device=device),
        )
        rest = [i for i, done in enumerate(certified.tolist()) if not done]
        if rest:
            rows = torch.tensor(rest, dtype=torch.int64, device=device)
            if len(rest) < batch:
                a_rest, gram = a[rows], None if gram is None else gram[rows]
            else:
                a_rest = a
            solved = _solve(a_rest, gram, epsilon, slack)
            result.sv_min[rows], result.sv_max[rows] = solved.sv[:, 0], solved.sv[:, -1]
            result.num_clipped[rows], result.fallback[rows] = solved.num_clipped, solved.fallback
            result.degenerate[rows], result.nonfinite[rows] = solved.degenerate, solved.nonfinite
            if solved.changed:
                result.matrices = a.clone()
                result.matrices[rows] = torch.where(solved.nonfinite[:, None, None], a_rest, solved.matrices)
        if matrices.shape[-2] > matrices.shape[-1]:
            result.matrices = result.matrices.mT
        return result


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


def singular_values(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Singular values of a conv/linear weight, per group: ``(groups, min(m, n))``, descending.

    Uses the Gram route in float64 (relative error below ~1e-6 for condition numbers up to 1e5) and a float64
    SVD for matrices beyond that.
    """
    a = weight_matrices(weight.detach(), groups).double()
    if a.shape[-2] > a.shape[-1]:
        a = a.mT
    with _full_precision():
        scale, _ = _scale(a)
        x = a / scale[:, None, None]
        eigvals, _ = _eigh(x @ x.mT, torch.float64)
        s = (eigvals.clamp_min(0).sqrt() * scale[:, None]).flip(-1)
        bad = ~(s[:, 0] <= _GRAM64_COND_LIMIT * s[:, -1])
        if bad.any():
            s[bad] = torch.linalg.svdvals(a[bad])
    return s


def bbn_alpha(
    gamma: torch.Tensor, running_var: torch.Tensor | None, eps: float | torch.Tensor, mode: str = "sigma"
) -> torch.Tensor:
    """BBN's reference scale: ``alpha = mean(gamma / sigma)`` with ``sigma = sqrt(running_var + eps)``
    (``mode="sigma"``, Algorithm 2), or ``mean(gamma)`` (``mode="rel"``); the mean over the last dim (a
    0-dim tensor for one layer's 1-D gammas; a stack ``(B, C)`` gives ``(B,)``, with ``eps`` a float or
    ``(B, 1)``).

    BBN is defined only for ``alpha > 0``: at ``alpha = 0`` (all-zero gammas, as timm's ``zero_init_last``
    leaves the last BN of each residual block) the ratios are undefined, and below 0 they would flip the sign
    of the whole layer. :func:`bbn_gamma` leaves such a layer unchanged.
    """
    return _bbn_terms(gamma, running_var, eps, mode)[2].squeeze(-1)


def bbn_ratio(
    gamma: torch.Tensor, running_var: torch.Tensor | None, eps: float | torch.Tensor, mode: str = "sigma"
) -> torch.Tensor:
    """The ratios BBN bounds, in float32 (float64 for float64 input).

    ``mode="sigma"`` (Algorithm 2): ``gamma / (sigma * alpha)`` with ``sigma = sqrt(running_var + eps)``
    and ``alpha = mean(gamma / sigma)``. ``mode="rel"`` (the reference code's default):
    ``gamma / mean(gamma)``. Meaningful only where :func:`bbn_alpha` is > 0. Stacks as in :func:`bbn_alpha`.
    """
    return _bbn_terms(gamma, running_var, eps, mode)[1]


def _bbn_terms(
    gamma: torch.Tensor, running_var: torch.Tensor | None, eps: float | torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale, ratio, alpha)`` with ``gamma = scale * ratio``: ``scale = sigma * alpha`` (or
    ``mean(gamma)``); ``alpha`` keeps the last dim (size 1)."""
    g = gamma.detach().to(_compute_dtype(gamma.dtype))
    if mode == "sigma":
        if running_var is None:
            raise ValueError("BBN mode 'sigma' needs the running variance (track_running_stats=True)")
        sigma = (running_var.detach().to(g.dtype) + eps).sqrt()
    elif mode == "rel":
        sigma = torch.ones_like(g)
    else:
        raise ValueError(f"bbn_mode must be 'sigma' or 'rel', got {mode!r}")
    alpha = (g / sigma).mean(-1, keepdim=True)
    scale = sigma * alpha
    return scale, g / scale, alpha


def bbn_gamma(
    gamma: torch.Tensor,
    running_var: torch.Tensor | None,
    eps: float | torch.Tensor,
    bbn_epsilon: float,
    mode: str = "sigma",
) -> torch.Tensor:
    """Bounded Batch Normalization (Algorithm 2): the bounded BN scale, a new tensor like ``gamma``.

    Where the ratio of :func:`bbn_ratio` exceeds ``1 + bbn_epsilon``, ``gamma = sigma * alpha *
    (1 + bbn_epsilon)``; where it is below ``1 / (1 + bbn_epsilon)``, ``gamma = sigma * alpha /
    (1 + bbn_epsilon)`` (in "rel" mode ``sigma * alpha`` is ``mean(gamma)``). No absolute values are taken,
    as in the paper. Gammas in band are returned unchanged; beta and the running statistics are not inputs.
    Where ``alpha <= 0`` (:func:`bbn_alpha`) the whole ``gamma`` is returned unchanged. A ``(B, C)`` stack
    of layers is bounded row by row, without a host sync.
    """
    lo, hi = band(bbn_epsilon)
    scale, ratio, alpha = _bbn_terms(gamma, running_var, eps, mode)
    bounded = torch.where(ratio > hi, scale * hi, scale * lo)
    move = ((ratio > hi) | (ratio < lo)) & (alpha > 0)
    return torch.where(move, bounded.to(gamma.dtype), gamma.detach()).clone()


_CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@torch.no_grad()
def orthogonal_init_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Orthogonal initialisation (Algorithm 1, line 1), in place; returns ``module``.

    Every Conv1d/2d/3d and Linear weight gets all singular values 1 per group (a random semi-orthogonal
    ``(out/groups) x (in/groups * prod(k))`` matrix); every BatchNorm gets weight 1 and bias 0. Biases of
    conv and linear layers are left as they are. Weights keep their dtype, device and memory format
    (channels_last included).
    """
    for m in module.modules():
        if isinstance(m, _CONV_LINEAR):
            groups = getattr(m, "groups", 1)
            rows, cols = m.weight.shape[0] // groups, m.weight[0].numel()
            new = torch.stack([_random_semi_orthogonal(rows, cols, generator) for _ in range(groups)])
            # one copy from a fresh tensor: the weight may be a view whose reshape would alias it
            m.weight.copy_(new.reshape(m.weight.shape))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def _random_semi_orthogonal(rows: int, cols: int, generator: torch.Generator | None) -> torch.Tensor:
    """A ``rows x cols`` matrix with orthonormal rows or columns, Haar-distributed (QR with sign fix)."""
    # float32 Householder QR: orthonormal to ~1e-6, at half the cost of float64 on the widest layers
    flat = torch.randn(max(rows, cols), min(rows, cols), generator=generator)
    q, r = torch.linalg.qr(flat)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q if rows >= cols else q.T
