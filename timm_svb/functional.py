"""The math of SVB and BBN as pure functions (Jia et al., CVPR 2017, Algorithms 1 and 2).

Nothing here holds state or walks a model except :func:`orthogonal_init_`; the :class:`timm_svb.SVB`
plugin batches layers and calls the certificate, the solver (both in the private ``timm_svb._solver``) and
:func:`bbn_gamma`.

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
from dataclasses import dataclass

import torch
from torch import nn

from ._solver import (
    _GRAM64_COND_LIMIT,
    _certify_parts,
    _compute_dtype,
    _eigh,
    _full_precision,
    _oriented,
    _outside,
    _scale,
    _solve,
)

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

# Relative slack around the band within which a singular value counts as in band, by the weight's dtype: a
# matrix is rewritten only if some value is outside the band by more than this. float32: a few times the
# Gram routes' error (``_solver._ROUTES``): a matrix bounded a moment ago reads back as in band, bit for bit
# unchanged.
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
    return _outside(values, *band(epsilon), slack)


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


def certify_in_band(matrices: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``(B,)`` True where every singular value of a matrix in the ``(B, m, n)`` stack is proved, despite
    rounding, to lie in ``[1/(1+epsilon), 1+epsilon]`` to within :func:`band_slack` of its dtype.

    A certificate, not an estimate: positive definiteness of ``hi^2 I - A A^T`` and ``A A^T - lo^2 I``
    (smaller side), decided by one batched Cholesky with a margin that bounds every rounding error (see
    ``_solver._certificate_margin``). False can also mean "too close to an edge to tell"; True is never wrong.
    """
    if matrices.dim() != 3:
        raise ValueError(f"expected a (B, m, n) stack of matrices, got shape {tuple(matrices.shape)}")
    with _full_precision():
        return _certify_parts([_oriented(matrices)], *band(epsilon), band_slack(matrices.dtype))[0]


def clip_singular_values(matrices: torch.Tensor, epsilon: float, *, certify: bool = True) -> BoundResult:
    """Clip every singular value of each matrix in a ``(B, m, n)`` stack to ``[1/(1+eps), 1+eps]``.

    Singular vectors are kept. With ``certify`` (default) the test of :func:`certify_in_band` comes first:
    matrices it proves in band are returned bit for bit unchanged, ``certified``, without a solver and so
    without singular values (``sv_min``/``sv_max`` NaN). The others take the cheapest route that resolves
    their condition number (see ``_solver._ROUTES``): the Gram matrix of the smaller side with a float32 or
    float64 eigendecomposition, the float64 Gram, or a float64 SVD for matrices beyond that or rank-deficient;
    computed in float32 (float64 for float64 input), weights of extreme magnitude scaled by a power of two
    first. A matrix is rewritten only if a singular value is outside the band by more than
    :func:`band_slack` of the input dtype; then every such value is set to the band edge (to within 5e-6
    relative). Matrices with nothing to clip, all-zero matrices (``degenerate``) and matrices holding
    NaN/Inf (``nonfinite``) are returned bit for bit unchanged (when none changes, ``matrices`` may be the
    input tensor itself).
    """
    if matrices.dim() != 3:
        raise ValueError(f"expected a (B, m, n) stack of matrices, got shape {tuple(matrices.shape)}")
    lo, hi = band(epsilon)
    with _full_precision():
        a = _oriented(matrices)
        slack = band_slack(matrices.dtype)
        batch, device = a.shape[0], a.device
        certified, gram = torch.zeros(batch, dtype=torch.bool, device=device), None
        if certify:
            certified, gram = _certify_parts([a], lo, hi, slack)
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
            solved = _solve(a_rest, gram, lo, hi, slack)
            result.sv_min[rows], result.sv_max[rows] = solved.sv[:, 0], solved.sv[:, -1]
            result.num_clipped[rows], result.fallback[rows] = solved.num_clipped, solved.fallback
            result.degenerate[rows], result.nonfinite[rows] = solved.degenerate, solved.nonfinite
            if solved.changed:
                result.matrices = a.clone()
                result.matrices[rows] = torch.where(solved.nonfinite[:, None, None], a_rest, solved.matrices)
        if matrices.shape[-2] > matrices.shape[-1]:
            result.matrices = result.matrices.mT
        return result


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
