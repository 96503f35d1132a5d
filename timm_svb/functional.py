"""The math of SVB and BBN as pure functions (Jia et al., CVPR 2017, Algorithms 1 and 2).

Nothing here holds state or walks a model except :func:`orthogonal_init_`; the :class:`timm_svb.SVB`
plugin batches layers and calls :func:`clip_singular_values` and :func:`bbn_gamma`.

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
from collections.abc import Iterator
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
    """

    matrices: torch.Tensor
    sv_min: torch.Tensor
    sv_max: torch.Tensor
    num_clipped: torch.Tensor
    fallback: torch.Tensor
    degenerate: torch.Tensor


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


# Matrices whose largest |entry| is within this factor of 1 are used as they are (their Gram is far from
# float32's range limits); others are first divided by a power of two, which is exact, so that the Gram of
# weights around 1e-24 or 1e20 neither under- nor overflows.
_UNSCALED_RANGE = 2.0**40


def _scale(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B,)`` powers of two to divide the matrices of ``a`` by (mostly 1), and the mask of zero matrices."""
    low, high = torch.aminmax(a.flatten(1), dim=1)
    amax = torch.maximum(-low, high)
    _, exponent = torch.frexp(amax)
    in_range = (amax >= 1 / _UNSCALED_RANGE) & (amax <= _UNSCALED_RANGE)
    scale = torch.where(in_range | (amax == 0), 1.0, torch.ldexp(torch.ones_like(amax), exponent))
    return scale, amax == 0


def _svd_clip(a: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference route: float64 SVD, clip, rebuild. Returns (bounded float64 matrices, singular values
    ascending)."""
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return (u * s.clamp(lo, hi).unsqueeze(-2)) @ vh, s.flip(-1)


def clip_singular_values(matrices: torch.Tensor, epsilon: float) -> BoundResult:
    """Clip every singular value of each matrix in a ``(B, m, n)`` stack to ``[1/(1+eps), 1+eps]``.

    Singular vectors are kept. Computed in float32 (float64 for float64 input): each matrix takes the
    cheapest route that resolves its condition number (see ``_ROUTES``): the Gram matrix of its smaller side
    with a float32 or float64 eigendecomposition, the float64 Gram, or a float64 SVD for matrices beyond that
    or rank-deficient. Weights of extreme magnitude are scaled by a power of two first. A matrix is rewritten
    only if a singular value is outside the band by more than :func:`band_slack` of the input dtype; then
    every such value is set to the band edge (to within 5e-6 relative). Matrices with nothing to clip, and
    all-zero matrices (reported ``degenerate``), are returned bit for bit unchanged (when none changes,
    ``matrices`` may be the input tensor itself). The input must be finite (the caller checks, so that it
    can name the layer).
    """
    if matrices.dim() != 3:
        raise ValueError(f"expected a (B, m, n) stack of matrices, got shape {tuple(matrices.shape)}")
    with _full_precision():
        return _clip_singular_values(matrices, epsilon)


def _clip_singular_values(matrices: torch.Tensor, epsilon: float) -> BoundResult:
    lo, hi = band(epsilon)
    slack = band_slack(matrices.dtype)
    compute_dtype = _compute_dtype(matrices.dtype)
    a = matrices.to(compute_dtype)
    scale, degenerate = _scale(a)
    transposed = a.shape[-2] > a.shape[-1]
    if transposed:
        a = a.mT
    batch, p = a.shape[0], a.shape[-2]
    scaled = a if bool((scale == 1).all()) else a / scale[:, None, None]
    sv = torch.zeros(batch, p, dtype=torch.float64, device=a.device)  # ascending
    num_clipped = torch.zeros(batch, dtype=torch.int64, device=a.device)
    fallback = torch.zeros(batch, dtype=torch.bool, device=a.device)
    out = a
    todo = (~degenerate).nonzero().flatten()
    gram = None  # the Gram of the matrices in todo, reused by the next route that forms it in one dtype
    for gram_dtype, eigh_dtype, cond_limit in _ROUTES[compute_dtype]:
        if not todo.numel():
            break
        x = (scaled if todo.numel() == batch else scaled[todo]).to(gram_dtype)
        if gram is None or gram.dtype != gram_dtype:
            gram = x @ x.mT
        eigvals, u = _eigh(gram, eigh_dtype)
        s = eigvals.clamp_min(0).sqrt()
        true_s = s.double() * scale[todo, None].double()
        # Decide the route on the Gram's own estimate: its error blurs s_min only for condition numbers far
        # beyond the limit, so an ill-conditioned matrix is never taken for a well-conditioned one.
        # Non-finite or zero s_min fails the test and moves on.
        ok = s[:, -1] <= cond_limit * s[:, 0]
        if gram_dtype == torch.float32:
            ok &= (true_s[:, 0] * _FLOAT32_FACTOR_LIMIT >= hi) & (true_s[:, -1] <= lo * _FLOAT32_FACTOR_LIMIT)
        done, u, true_s = todo[ok], u[ok], true_s[ok]
        sv[done] = true_s
        fallback[done] = gram_dtype == torch.float64
        clipped = outside_band(true_s, epsilon, slack)
        num_clipped[done] = clipped.sum(-1)
        changed = clipped.any(-1)
        if changed.any():
            factor = torch.where(clipped, true_s.clamp(lo, hi) / true_s, 1.0).to(gram_dtype)
            rows = done[changed]
            new = _rebuild(x[ok][changed], u[changed].to(gram_dtype), factor[changed], clipped[changed])
            out = out.clone() if out is a else out
            out[rows] = (new * scale[rows, None, None].to(gram_dtype)).to(compute_dtype)
        todo, gram = todo[~ok], gram[~ok]
    if todo.numel():
        exact, s64 = _svd_clip(a[todo], lo, hi)
        n64 = outside_band(s64, epsilon, slack).sum(-1)
        sv[todo], fallback[todo], num_clipped[todo] = s64, True, n64
        if (n64 > 0).any():
            out = out.clone() if out is a else out
            out[todo[n64 > 0]] = exact[n64 > 0].to(compute_dtype)
    if transposed:
        out = out.mT
    return BoundResult(out, sv[:, 0], sv[:, -1], num_clipped, fallback, degenerate)


def _rebuild(a: torch.Tensor, u: torch.Tensor, factor: torch.Tensor, clipped: torch.Tensor) -> torch.Tensor:
    """``A + U_c diag(factor_c - 1) U_c^T A`` over the clipped directions only (``factor`` is 1 elsewhere).

    eigh sorts ascending, so the clipped directions are a prefix (too small) and a suffix (too large) of
    ``u``'s columns; taking the widest prefix and suffix over the stack keeps it one batched product, with
    ``factor - 1 = 0`` for columns that are not clipped in a given matrix. Within a route's condition limit
    the shrinking factors are >= ~0.1, so the thin form loses no accuracy to cancellation.
    """
    p = u.shape[-1]
    n_low = int(clipped.int().cumprod(-1).sum(-1).max())
    n_high = int(clipped.flip(-1).int().cumprod(-1).sum(-1).max())
    if n_low + n_high >= p // 2:
        # Many directions: one p x p operator U diag(factor) U^T beats two thin products (and, unlike
        # A + U diag(factor - 1) U^T A, does not cancel A away when every direction shrinks a lot).
        return ((u * factor.unsqueeze(-2)) @ u.mT) @ a
    cols = torch.cat([torch.arange(n_low), torch.arange(p - n_high, p)]).to(u.device)
    u_c = u[..., cols]
    scale = (factor[..., cols] - 1).unsqueeze(-1)
    return a + u_c @ (scale * (u_c.mT @ a))


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
    gamma: torch.Tensor, running_var: torch.Tensor | None, eps: float, mode: str = "sigma"
) -> torch.Tensor:
    """BBN's reference scale (a 0-dim tensor): ``alpha = mean(gamma / sigma)`` with
    ``sigma = sqrt(running_var + eps)`` (``mode="sigma"``, Algorithm 2), or ``mean(gamma)`` (``mode="rel"``).

    BBN is defined only for ``alpha > 0``: at ``alpha = 0`` (all-zero gammas, as timm's ``zero_init_last``
    leaves the last BN of each residual block) the ratios are undefined, and below 0 they would flip the sign
    of the whole layer. :func:`bbn_gamma` leaves such a layer unchanged.
    """
    return _bbn_terms(gamma, running_var, eps, mode)[2]


def bbn_ratio(
    gamma: torch.Tensor, running_var: torch.Tensor | None, eps: float, mode: str = "sigma"
) -> torch.Tensor:
    """The ratios BBN bounds, in float32 (float64 for float64 input).

    ``mode="sigma"`` (Algorithm 2): ``gamma / (sigma * alpha)`` with ``sigma = sqrt(running_var + eps)``
    and ``alpha = mean(gamma / sigma)``. ``mode="rel"`` (the reference code's default):
    ``gamma / mean(gamma)``. Meaningful only where :func:`bbn_alpha` is > 0.
    """
    return _bbn_terms(gamma, running_var, eps, mode)[1]


def _bbn_terms(
    gamma: torch.Tensor, running_var: torch.Tensor | None, eps: float, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale, ratio, alpha)`` with ``gamma = scale * ratio``: ``scale = sigma * alpha`` (or
    ``mean(gamma)``)."""
    g = gamma.detach().to(_compute_dtype(gamma.dtype))
    if mode == "sigma":
        if running_var is None:
            raise ValueError("BBN mode 'sigma' needs the running variance (track_running_stats=True)")
        sigma = (running_var.detach().to(g.dtype) + eps).sqrt()
    elif mode == "rel":
        sigma = torch.ones_like(g)
    else:
        raise ValueError(f"bbn_mode must be 'sigma' or 'rel', got {mode!r}")
    alpha = (g / sigma).mean()
    scale = sigma * alpha
    return scale, g / scale, alpha


def bbn_gamma(
    gamma: torch.Tensor,
    running_var: torch.Tensor | None,
    eps: float,
    bbn_epsilon: float,
    mode: str = "sigma",
) -> torch.Tensor:
    """Bounded Batch Normalization (Algorithm 2): the bounded BN scale, a new tensor like ``gamma``.

    Where the ratio of :func:`bbn_ratio` exceeds ``1 + bbn_epsilon``, ``gamma = sigma * alpha *
    (1 + bbn_epsilon)``; where it is below ``1 / (1 + bbn_epsilon)``, ``gamma = sigma * alpha /
    (1 + bbn_epsilon)`` (in "rel" mode ``sigma * alpha`` is ``mean(gamma)``). No absolute values are taken,
    as in the paper. Gammas in band are returned unchanged; beta and the running statistics are not inputs.
    Where ``alpha <= 0`` (:func:`bbn_alpha`) the whole ``gamma`` is returned unchanged.
    """
    lo, hi = band(bbn_epsilon)
    scale, ratio, alpha = _bbn_terms(gamma, running_var, eps, mode)
    if not alpha > 0:
        return gamma.detach().clone()
    bounded = torch.where(ratio > hi, scale * hi, torch.where(ratio < lo, scale * lo, scale.new_zeros(())))
    return torch.where((ratio > hi) | (ratio < lo), bounded.to(gamma.dtype), gamma.detach()).clone()


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
