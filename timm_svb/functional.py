"""The math of SVB and BBN as pure functions (Jia et al., CVPR 2017, Algorithms 1 and 2).

Nothing here holds state or walks a model except :func:`orthogonal_init_`; the :class:`timm_svb.SVB`
plugin batches layers and calls :func:`clip_singular_values` and :func:`bbn_gamma`.

The fast route for clipping the singular values of a stack of ``m x n`` matrices ``A`` (``m <= n``; tall
matrices are transposed) is the eigendecomposition of the small Gram matrix ``G = A A^T = U diag(s^2) U^T``.
Since ``A = U diag(s) V^T``, the bounded matrix is ``U diag(clip(s)) V^T = U diag(clip(s)/s) U^T A``, so
``V`` is never formed and only clipped directions need rebuilding:
``A' = A + U_c diag(clip(s_c)/s_c - 1) U_c^T A``. Squaring the singular values costs precision, so a
matrix whose condition number is beyond what the working dtype resolves falls back to a float64 SVD.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BoundResult",
    "band",
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

# Largest condition number (s_max / s_min) a matrix may have for the float32 Gram route: the Gram squares
# it, and eigenvalue errors of about eps32 * s_max^2 must stay far below s_min^2. At 30 the relative error of
# the rebuilt matrix against a float64 SVD stays below ~1e-5 (tests/test_functional.py measures it). For
# float64 inputs the Gram route is exact enough up to ~1e5.
_GRAM_COND_LIMIT = {torch.float32: 30.0, torch.float64: 1e5}

# Relative slack around the band within which a singular value counts as in band. The Gram route resolves a
# singular value to a few 1e-6 in float32, so a value bounded a moment ago can read as 1.5000020; rewriting
# it would only add rounding noise (and a weight already in band must stay bit for bit unchanged).
BAND_SLACK = {torch.float32: 2e-5, torch.float64: 1e-10}


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
        sv_min: ``(B,)`` smallest singular value of each input matrix.
        sv_max: ``(B,)`` largest singular value of each input matrix.
        num_clipped: ``(B,)`` number of singular values outside the band.
        fallback: ``(B,)`` True where the float64 SVD fallback was used.
    """

    matrices: torch.Tensor
    sv_min: torch.Tensor
    sv_max: torch.Tensor
    num_clipped: torch.Tensor
    fallback: torch.Tensor


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


def _gram_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (ascending) and left singular vectors of ``a`` (``..., m, n`` with ``m <= n``)."""
    gram = a @ a.mT
    if gram.device.type == "cpu" and gram.dim() == 3 and gram.shape[0] > 1:
        # torch's batched float32 eigh on the CPU is more than 10x slower than a loop over the batch
        # (benchmarks/svb_speed.py); on GPUs the batched solver is the fast one.
        pairs = [torch.linalg.eigh(g) for g in gram]
        eigvals, eigvecs = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    else:
        eigvals, eigvecs = torch.linalg.eigh(gram)
    return eigvals.clamp_min(0).sqrt(), eigvecs


def _svd_clip(a: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference route: float64 SVD, clip, rebuild. Returns (bounded float64 matrices, singular values)."""
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return (u * s.clamp(lo, hi).unsqueeze(-2)) @ vh, s


def clip_singular_values(matrices: torch.Tensor, epsilon: float) -> BoundResult:
    """Clip every singular value of each matrix in a ``(B, m, n)`` stack to ``[1/(1+eps), 1+eps]``.

    Singular vectors are kept. Computed in float32 (float64 for float64 input) through the Gram matrix of the
    smaller side; matrices whose condition number is too large for that route are redone with a float64
    SVD, so singular values from 1e-5 to 10 come out as a float64 SVD gives them. Matrices with nothing to
    clip are returned bit for bit unchanged (when none has, ``matrices`` may be the input tensor itself).
    The input must be finite (the caller checks, so that it can
    name the layer).
    """
    if matrices.dim() != 3:
        raise ValueError(f"expected a (B, m, n) stack of matrices, got shape {tuple(matrices.shape)}")
    with _full_precision():
        return _clip_singular_values(matrices, epsilon)


def _clip_singular_values(matrices: torch.Tensor, epsilon: float) -> BoundResult:
    lo, hi = band(epsilon)
    compute_dtype = _compute_dtype(matrices.dtype)
    a = matrices.to(compute_dtype)
    transposed = a.shape[-2] > a.shape[-1]
    if transposed:
        a = a.mT
    s, u = _gram_eigh(a)  # s ascending, (B, p); u (B, p, p)
    # Decide the fallback on the Gram's own estimate: its eigenvalues carry absolute errors of about
    # eps * s_max^2, which blur s_min only for condition numbers near 1/sqrt(eps) (~3000 in float32), far
    # beyond the limit, so an ill-conditioned matrix is never taken for a well-conditioned one.
    cond_limit = _GRAM_COND_LIMIT[compute_dtype]
    fallback = s[:, -1] > cond_limit * s[:, 0]
    slack = BAND_SLACK[compute_dtype]
    outside = outside_band(s, epsilon, slack)
    # s = 0 only occurs with the fallback, which ignores factor.
    factor = s.clamp(lo, hi) / s.clamp_min(torch.finfo(compute_dtype).tiny)
    clipped = outside & ~fallback.unsqueeze(-1)
    out = a.clone() if clipped.any() or fallback.any() else a
    todo = clipped.any(-1).nonzero().flatten()
    if todo.numel():
        out[todo] = _rebuild(a[todo], u[todo], factor[todo], clipped[todo])
    sv_min, sv_max = s[:, 0].clone(), s[:, -1].clone()
    num_clipped = clipped.sum(-1)
    if fallback.any():
        idx = fallback.nonzero().flatten()
        exact, s64 = _svd_clip(a[idx], lo, hi)
        n64 = outside_band(s64, epsilon, slack).sum(-1)
        changed = idx[n64 > 0]
        out[changed] = exact[n64 > 0].to(compute_dtype)
        sv_min[idx], sv_max[idx] = s64[:, -1].to(s.dtype), s64[:, 0].to(s.dtype)
        num_clipped[idx] = n64
    if transposed:
        out = out.mT
    return BoundResult(out, sv_min, sv_max, num_clipped, fallback)


def _rebuild(a: torch.Tensor, u: torch.Tensor, factor: torch.Tensor, clipped: torch.Tensor) -> torch.Tensor:
    """``A + U_c diag(factor_c - 1) U_c^T A`` over the clipped directions only.

    eigh sorts ascending, so the clipped directions are a prefix (too small) and a suffix (too large) of
    ``u``'s columns; taking the widest prefix and suffix over the stack keeps it one batched product, with
    ``factor - 1 = 0`` for columns that are in band in a given matrix.
    """
    p = u.shape[-1]
    n_low = int(clipped.int().cumprod(-1).sum(-1).max())
    n_high = int(clipped.flip(-1).int().cumprod(-1).sum(-1).max())
    if n_low + n_high >= p // 2:
        # Many directions: one p x p operator beats two thin products.
        op = (u * (factor - 1).unsqueeze(-2)) @ u.mT
        return a + op @ a
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
        s, _ = _gram_eigh(a)
        bad = s[:, -1] > _GRAM_COND_LIMIT[torch.float64] * s[:, 0]
        s = s.flip(-1)
        if bad.any():
            s[bad] = torch.linalg.svdvals(a[bad])
    return s


def bbn_ratio(
    gamma: torch.Tensor, running_var: torch.Tensor | None, eps: float, mode: str = "sigma"
) -> torch.Tensor:
    """The ratios BBN bounds, in float32 (float64 for float64 input).

    ``mode="sigma"`` (Algorithm 2): ``gamma / (sigma * alpha)`` with ``sigma = sqrt(running_var + eps)``
    and ``alpha = mean(gamma / sigma)``. ``mode="rel"`` (the reference code's default):
    ``gamma / mean(gamma)``.
    """
    return _bbn_terms(gamma, running_var, eps, mode)[1]


def _bbn_terms(
    gamma: torch.Tensor, running_var: torch.Tensor | None, eps: float, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, ratio)`` with ``gamma = scale * ratio``: ``scale = sigma * alpha`` (or ``mean(gamma)``)."""
    g = gamma.detach().to(_compute_dtype(gamma.dtype))
    if mode == "sigma":
        if running_var is None:
            raise ValueError("BBN mode 'sigma' needs the running variance (track_running_stats=True)")
        sigma = (running_var.detach().to(g.dtype) + eps).sqrt()
    elif mode == "rel":
        sigma = torch.ones_like(g)
    else:
        raise ValueError(f"bbn_mode must be 'sigma' or 'rel', got {mode!r}")
    scale = sigma * (g / sigma).mean()
    return scale, g / scale


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
    """
    lo, hi = band(bbn_epsilon)
    scale, ratio = _bbn_terms(gamma, running_var, eps, mode)
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
