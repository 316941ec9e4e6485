"""Structured OBS pruning of a linear layer's input columns (ZipLM, Kurtic et al. 2023).

For y = W x with calibration Hessian H = sum_t x_t x_t^T, the input columns are split into
contiguous groups (an MLP neuron = 1 column, an attention KV group with its query heads =
``group_size`` columns). Groups are removed greedily, one per step: the group S with the smallest
OBS cost tr(W_S (Hinv_SS)^{-1} W_S^T) goes, the kept weights absorb its contribution
(W <- W - W_S Hinv_SS^{-1} Hinv_{S,:}) and Hinv is downdated to the inverse restricted to the kept
columns. One sweep from all groups down to the smallest requested level yields every level.

Implementation notes (why it looks the way it does):
* The sweep only decides the removal ORDER. OBS is exact for a quadratic objective, so the kept
  weights after removing any set are the damped least-squares refit W_K = W H_d[:, K] H_d[K, K]^-1
  whatever order the set went in. Each requested level's weight is therefore recomputed from that
  closed form in float64, and its error from the weight as returned: rounding in the sweep can at
  worst flip a near-tie in the order, never make a reported weight or error inexact.
* Removed groups are masked, not deleted, so a step is two in-place rank-g updates. At each
  requested level, and whenever masked groups make up a quarter of the working tensors, the
  tensors are compacted and Hinv, W re-derived exactly in float64 (that re-derivation is the
  level's weight). This keeps per-step cost proportional to the kept size and bounds rounding
  drift, which is why float32 is a safe default for the sweep (~15% faster than float64).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PrunedLevel", "structured_obs_sweep"]

# Masked rows/columns are compacted away when they reach this fraction of the working tensors.
_COMPACT_FRACTION = 0.25


@dataclass(frozen=True)
class PrunedLevel:
    kept_groups: torch.Tensor  # int64, sorted ascending indices of kept groups
    weight: torch.Tensor  # (d_out, len(kept_groups) * group_size), OBS-updated, input dtype
    error: float  # tr(dW H dW^T) with the undamped H: exact output error on the calibration data
    relative_error: float  # error / tr(W H W^T)  (0 when that is 0)


def structured_obs_sweep(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    keep_levels: Sequence[int],
    damp: float = 0.01,
    *,
    sweep_dtype: torch.dtype = torch.float32,
) -> dict[int, PrunedLevel]:
    """Greedy structured OBS sweep; returns one PrunedLevel per requested number of kept groups.

    Runs on ``weight.device``. ``sweep_dtype`` is the precision of the per-step updates that pick
    the removal order (float32: faster; float64: the reference). Reported weights and errors are
    always computed in float64 from the closed form, whatever ``sweep_dtype`` is.
    """
    n_groups, levels = _validate(weight, hessian, group_size, keep_levels, damp, sweep_dtype)
    if not levels:
        return {}
    if levels == [n_groups]:
        # Only the dense level (a space whose other options are sparse): nothing to sweep or factor.
        kept = torch.arange(n_groups)
        return {n_groups: PrunedLevel(kept, weight.detach().clone(), 0.0, 0.0)}
    dev = weight.device
    w64 = weight.detach().to(dtype=torch.float64)
    h64 = hessian.detach().to(device=dev, dtype=torch.float64)
    # Accumulated Hessians can be asymmetric by rounding. One new (d_in, d_in) tensor, halved in place (x 0.5 and
    # / 2 are the same exact operation): at d_in = 14336 (Llama-3-8B's down_proj) each such copy is 1.6 GB.
    h64 = h64 + h64.T
    h64.mul_(0.5)
    h_damped = _damped(h64, damp)
    wh_damped = w64 @ h_damped  # W H_d: the closed-form kept weights are (W H_d)_K H_d[K, K]^{-1}

    # Dead columns (never activated) cost nothing to remove on the calibration data: zero them for
    # the ORDER so they go first, as SparseGPT does. H_d decouples them from the other columns, so
    # the final weights can use the original W (a kept dead column keeps its weight).
    dead = torch.diagonal(h64) == 0
    wh_order = torch.where(dead, 0.0, w64) @ h_damped if bool(dead.any()) else wh_damped
    swept = _removal_sweep(wh_order, wh_damped, h_damped, group_size, levels, sweep_dtype)

    wh = w64 @ h64
    total = float((wh * w64).sum())
    out: dict[int, PrunedLevel] = {}
    for level, (kept, w_level) in swept.items():
        if level == n_groups:
            out[level] = PrunedLevel(kept, weight.detach().clone(), 0.0, 0.0)  # dense, bit-for-bit
            continue
        cols = _columns(kept, group_size).to(dev)
        w_kept = w_level.to(weight.dtype)
        # Error of the weight as returned (after the cast to the input dtype), with undamped H.
        # dW H = W H - W'_K H[K, :] costs d_out*k*d_in instead of d_out*d_in^2.
        w_kept64 = w_kept.to(torch.float64)
        delta = w64.clone()
        delta[:, cols] -= w_kept64
        error = max(float(((wh - w_kept64 @ h64[cols]) * delta).sum()), 0.0)
        out[level] = PrunedLevel(kept, w_kept, error, error / total if total > 0 else 0.0)
    return dict(sorted(out.items()))


def _validate(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    keep_levels: Sequence[int],
    damp: float,
    sweep_dtype: torch.dtype,
) -> tuple[int, list[int]]:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D tensor (d_out, d_in), got {_shape(weight)}")
    if not isinstance(hessian, torch.Tensor) or hessian.ndim != 2:
        raise ValueError(f"hessian must be a 2-D tensor (d_in, d_in), got {_shape(hessian)}")
    if not weight.is_floating_point() or not hessian.is_floating_point():
        raise ValueError(f"weight and hessian must be floating point, got {weight.dtype}, {hessian.dtype}")
    d_out, d_in = weight.shape
    if d_out == 0 or d_in == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if tuple(hessian.shape) != (d_in, d_in):
        raise ValueError(f"hessian must have shape ({d_in}, {d_in}) to match weight, got {tuple(hessian.shape)}")
    if not _is_int(group_size) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if d_in % int(group_size):
        raise ValueError(f"d_in={d_in} is not divisible by group_size={group_size}")
    if not (isinstance(damp, (int, float)) and not isinstance(damp, bool) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite float >= 0, got {damp!r}")
    if sweep_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"sweep_dtype must be torch.float32 or torch.float64, got {sweep_dtype}")
    if not torch.isfinite(weight).all() or not torch.isfinite(hessian).all():
        raise ValueError("weight and hessian must be finite (found NaN or inf)")
    if (torch.diagonal(hessian) < 0).any():
        raise ValueError("hessian has a negative diagonal entry; it must be sum_t x_t x_t^T (PSD)")
    n_groups = d_in // int(group_size)
    if isinstance(keep_levels, (str, bytes)) or not isinstance(keep_levels, Sequence):
        raise ValueError(f"keep_levels must be a sequence of ints, got {keep_levels!r}")
    for level in keep_levels:
        if not _is_int(level) or not 0 <= level <= n_groups:
            raise ValueError(f"keep level {level!r} must be an int in [0, {n_groups}] (n_groups)")
    return n_groups, sorted({int(level) for level in keep_levels})


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _shape(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag) * I, with dead (never-activated) columns given diag 1 first (SparseGPT)."""
    h = h.clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    return h


def _columns(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Column indices of the given groups, in group order."""
    return (groups[:, None] * group_size + torch.arange(group_size, device=groups.device)).reshape(-1)


def _chol(h: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(h)
    if bool((info != 0).any()):
        raise ValueError("damped Hessian is not positive definite on the kept columns; increase damp")
    return chol


def _removal_sweep(
    wh_order: torch.Tensor,
    wh_damped: torch.Tensor,
    h_damped: torch.Tensor,
    g: int,
    levels: list[int],
    dtype: torch.dtype,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Greedy removal down to the smallest level.

    Returns, for each requested level, the kept group ids (CPU) and the float64 kept weights
    W H_d[:, K] H_d[K, K]^{-1} of shape (d_out, k).
    """
    dev, d_out, n_groups = h_damped.device, wh_order.shape[0], h_damped.shape[0] // g
    wanted, stop_at = set(levels), levels[0]
    result: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    active = torch.arange(n_groups, device=dev)  # group ids of the working tensors' groups
    removed = torch.zeros(n_groups, dtype=torch.bool, device=dev)  # masked, indexed like `active`
    work_wt = work_hinv = torch.empty(0)
    n_kept, refresh = n_groups, True
    while True:
        if refresh:
            # Compact away masked groups and re-derive Hinv and W exactly in float64. Done at every
            # requested level (whose weight this is) and when a quarter of the tensors is masked.
            active, removed = active[~removed], removed[~removed]
            cols = _columns(active, g)
            # Nothing removed yet (the first refresh): H_d itself, not a copy of it.
            kept_h = h_damped if cols.numel() == h_damped.shape[0] else h_damped[cols][:, cols]
            hinv64 = torch.cholesky_inverse(_chol(kept_h))
            del kept_h
            wt64 = hinv64 @ wh_order[:, cols].T  # (W H_d[:, K] H_d[K, K]^{-1})^T, as (k, d_out)
            if n_kept in wanted:
                # Dead columns were zeroed in wh_order only to order them first; H_d decouples
                # them, so redoing the product with the original W changes just those columns.
                w_level = wt64.T if wh_order is wh_damped else (hinv64 @ wh_damped[:, cols].T).T
                result[n_kept] = (active.cpu(), w_level)
            # Copies even in float64: the in-place updates below must not touch w_level.
            work_wt, work_hinv = wt64.to(dtype, copy=True), hinv64.to(dtype, copy=True)
            del hinv64, wt64  # the working copies replace them (w_level keeps what it needs)
            refresh = False
        if n_kept == stop_at:
            return result
        m = active.numel()
        if g == 1:
            # OBS cost of one column: ||W_j||^2 / Hinv_jj, for all columns at once. W is kept
            # transposed because a contiguous row norm is ~10x faster than a strided column norm.
            diag = torch.diagonal(work_hinv)
            scores = torch.linalg.vector_norm(work_wt, dim=1).square_().div_(diag)
            broken = (diag <= 0) & ~removed
        else:
            blocks = work_hinv.view(m, g, m, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone()
            blocks[removed] = torch.eye(g, dtype=dtype, device=dev)  # masked blocks are ~0
            chol, info = torch.linalg.cholesky_ex(blocks)
            # tr(W_S Hinv_SS^{-1} W_S^T) = ||L^{-1} W_S^T||_F^2 with Hinv_SS = L L^T.
            z = torch.linalg.solve_triangular(chol, work_wt.view(m, g, d_out), upper=False)
            scores = z.square().sum((1, 2))
            broken = (info != 0) & ~removed
        if bool(broken.any()):
            # Rounding made a kept block of Hinv non-PD (conceivable only in float32 with a very
            # ill-conditioned H): re-derive Hinv exactly and finish the sweep in float64.
            if dtype == torch.float64:
                raise ValueError("damped Hessian is numerically singular; increase damp")
            dtype, refresh = torch.float64, True
            continue
        scores[removed] = math.inf
        s = int(torch.argmin(scores))
        if g == 1:
            u = work_hinv[:, s].clone()
            alpha = -1.0 / float(u[s])
            work_wt.addr_(u, work_wt[s].clone(), alpha=alpha)  # W -= W_s Hinv_{s,:} / Hinv_ss
            work_hinv.addr_(u, u, alpha=alpha)  # Hinv -= Hinv_{:,s} Hinv_{s,:} / Hinv_ss
        else:
            c = slice(s * g, (s + 1) * g)
            h_cols = work_hinv[:, c].clone()  # Hinv_{:,S}  (k, g)
            upd = torch.cholesky_solve(h_cols.T, chol[s])  # Hinv_SS^{-1} Hinv_{S,:}  (g, k)
            work_wt.addmm_(upd.T, work_wt[c].clone(), alpha=-1.0)  # W -= W_S upd
            work_hinv.addmm_(h_cols, upd, alpha=-1.0)  # Hinv -= Hinv_{:,S} upd
        removed[s] = True
        n_kept -= 1
        refresh = n_kept in wanted or m - n_kept >= max(1, int(_COMPACT_FRACTION * m))
