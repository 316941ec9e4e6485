"""Semi-/unstructured pruning of a linear layer's weight (out, in): magnitude, Wanda and SparseGPT.

All pruners share one signature, ``fn(weight, hessian, pattern, *, tokens, damp=0.01) -> PrunedWeight``, where
``hessian`` is the calibration H = sum_t x_t x_t^T (float64, summed over ``tokens`` tokens) of the layer's input.
The reported error is the exact output error on the calibration data, tr(dW H dW^T) = sum_t ||dW x_t||^2, of the
weight as returned (after the cast back to the input dtype), in float64 with the undamped H.

* magnitude: keep the largest |W|, compared over the whole matrix (classic layer-wise magnitude pruning).
* Wanda (Sun et al. 2023): keep the largest |W_ij| * ||X_j|| with ||X_j|| = sqrt(H_jj / tokens), compared within
  each output row (the paper's choice: rows are independent outputs). No weight update.
* SparseGPT (Frantar & Alistarh 2023): OBS with weight reconstruction. Columns are swept left to right; pruning
  column j's weights and folding the error into the columns right of j through the upper Cholesky factor U of the
  damped H^-1 (H^-1 = U^T U) is the OBS update restricted to the not-yet-processed columns. Masks are picked
  adaptively from w^2 / U_jj^2 on the already-updated weights: per 128-column block and per row (unstructured),
  per m-group (n:m), or once before the sweep (block sparsity, whose tiles span several columns).
  ``sparsegpt_levels`` factors H once and sweeps every requested pattern from it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from allocator.core.patterns import SparsityPattern, keep_top_per_row, pruned_count, select_mask

__all__ = [
    "PRUNERS",
    "PrunedWeight",
    "Pruner",
    "output_error",
    "prune_magnitude",
    "prune_sparsegpt",
    "prune_wanda",
    "sparsegpt_levels",
]

DEFAULT_BLOCKSIZE = 128  # SparseGPT's lazy-update block: mask choice and batched error propagation granularity
# Threads of the per-column loop on the CPU. Each column's update is a rank-1 update of (rows x <=128) elements, far
# too small to split: with 2 threads, synchronising them cost ~10x the work (one SmolLM2 unit ~63 s with 2 threads,
# ~6 s with 1, issue 17). The block-level work around the loop (mask choice, the lazy update of the later columns,
# the factorisation, the error) is large and keeps torch's thread count.
COLUMN_LOOP_THREADS = 1


@contextmanager
def column_loop_threads(device: torch.device) -> Iterator[None]:
    """torch's CPU thread count set to COLUMN_LOOP_THREADS inside the block (restored after); on a GPU nothing
    changes: the loop stays on the device."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before == COLUMN_LOOP_THREADS:
        yield
        return
    torch.set_num_threads(COLUMN_LOOP_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class PrunedWeight:
    weight: torch.Tensor  # (out, in), input dtype and device, exactly zero where mask is False
    mask: torch.Tensor  # bool (out, in), True = kept; satisfies the pattern exactly
    error: float  # tr(dW H dW^T) with the undamped H, float64


class Pruner(Protocol):
    def __call__(
        self,
        weight: torch.Tensor,
        hessian: torch.Tensor,
        pattern: SparsityPattern,
        *,
        tokens: int,
        damp: float = 0.01,
    ) -> PrunedWeight: ...


def output_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - W') H (W - W')^T) in float64: the summed squared output error over the calibration tokens."""
    delta = weight.detach().to(torch.float64) - pruned.detach().to(device=weight.device, dtype=torch.float64)
    h = hessian.detach().to(device=weight.device, dtype=torch.float64)
    # Clamp: H is PSD, so a negative value can only be rounding.
    return max(float(((delta @ h) * delta).sum()), 0.0)


def prune_magnitude(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern, *, tokens: int, damp: float = 0.01
) -> PrunedWeight:
    """Keep the largest |W| (unstructured: per output row, so every pruner keeps the same count of weights and the
    budgets count exactly). ``tokens``/``damp`` are unused (shared signature)."""
    _validate(weight, hessian, pattern, tokens, damp)
    return _masked(weight, hessian, select_mask(weight.detach().abs(), pattern, granularity="row"))


def prune_wanda(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern, *, tokens: int, damp: float = 0.01
) -> PrunedWeight:
    """Keep the largest |W_ij| * sqrt(H_jj / tokens) (unstructured: per output row). ``damp`` is unused."""
    _validate(weight, hessian, pattern, tokens, damp)
    norms = (torch.diagonal(hessian.detach()).to(device=weight.device, dtype=torch.float64) / tokens).sqrt()
    scores = weight.detach().to(torch.float64).abs() * norms
    return _masked(weight, hessian, select_mask(scores, pattern, granularity="row"))


def prune_sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern,
    *,
    tokens: int,
    damp: float = 0.01,
    blocksize: int = DEFAULT_BLOCKSIZE,
    sweep_dtype: torch.dtype = torch.float32,
) -> PrunedWeight:
    """SparseGPT for one pattern. ``tokens`` is unused (the method is invariant to H's scale).

    ``sweep_dtype`` is the precision of the column sweep (float32 as in the paper; float64 as a reference); the
    Hessian factorisation and the reported error are float64 either way.
    """
    _validate(weight, hessian, pattern, tokens, damp)
    _validate_sweep(blocksize, sweep_dtype)
    factors = _factor(weight, hessian, damp, sweep_dtype)
    return _sparsegpt_sweep(weight, hessian, factors, pattern, blocksize)


def sparsegpt_levels(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    patterns: Sequence[SparsityPattern],
    damp: float = 0.01,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    sweep_dtype: torch.dtype = torch.float32,
) -> dict[str, PrunedWeight]:
    """SparseGPT at every pattern, keyed by ``pattern.label``, from one factorisation of the damped Hessian.

    Each entry is identical to ``prune_sparsegpt`` with that pattern: the factorisation is the only shared work
    (the sweep itself depends on the pattern through the masks it picks along the way).
    """
    if isinstance(patterns, (str, bytes)) or not isinstance(patterns, Sequence):
        raise ValueError(f"patterns must be a sequence of SparsityPattern, got {type(patterns).__name__}")
    _validate(weight, hessian, None, 1, damp)
    for pattern in patterns:
        _validate_pattern(weight, pattern)
    _validate_sweep(blocksize, sweep_dtype)
    if not patterns:
        return {}
    factors = _factor(weight, hessian, damp, sweep_dtype)
    return {p.label: _sparsegpt_sweep(weight, hessian, factors, p, blocksize) for p in patterns}


PRUNERS: dict[str, Pruner] = {
    "sparsegpt": prune_sparsegpt,
    "wanda": prune_wanda,
    "magnitude": prune_magnitude,
}


def _masked(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor) -> PrunedWeight:
    pruned = torch.where(keep, weight.detach(), torch.zeros((), dtype=weight.dtype, device=weight.device))
    return PrunedWeight(pruned, keep, output_error(weight, pruned, hessian))


@dataclass(frozen=True)
class _Factors:
    w: torch.Tensor  # weight in the sweep dtype, dead input columns zeroed
    u: torch.Tensor  # upper Cholesky factor of the damped H^-1 (H^-1 = U^T U), sweep dtype


def _factor(weight: torch.Tensor, hessian: torch.Tensor, damp: float, dtype: torch.dtype) -> _Factors:
    h = hessian.detach().to(device=weight.device, dtype=torch.float64)
    h = h + h.T  # accumulated Hessians can be asymmetric by rounding; one new tensor, halved in place (exact)
    h.mul_(0.5)
    diag = torch.diagonal(h)
    dead = diag == 0
    # A never-activated input: its weights cannot affect the calibration outputs, so zero them (free to prune)
    # and give H a unit diagonal there so that it stays invertible (SparseGPT's convention).
    diag[dead] = 1.0
    diag += damp * diag.mean()
    chol, info = torch.linalg.cholesky_ex(h)
    del h, diag  # (d_in, d_in) float64 (diag is a view of it): freed before the inverse and its factor are made
    if bool(info != 0):
        raise ValueError("damped Hessian is not positive definite; increase damp")
    inverse = torch.cholesky_inverse(chol)
    del chol
    u, info = torch.linalg.cholesky_ex(inverse, upper=True)
    del inverse
    if bool(info != 0):
        raise ValueError("damped Hessian is numerically singular (its inverse is not positive definite); increase damp")
    w = weight.detach().to(torch.float64).clone()
    w[:, dead] = 0.0
    return _Factors(w.to(dtype), u.to(dtype))


def _sparsegpt_sweep(
    weight: torch.Tensor, hessian: torch.Tensor, factors: _Factors, pattern: SparsityPattern, blocksize: int
) -> PrunedWeight:
    w, u = factors.w.clone(), factors.u
    rows, cols = w.shape
    u_diag = torch.diagonal(u)
    if pattern.kind == "block":
        # A tile spans several columns, so its fate must be known before its first column is swept.
        keep = select_mask(w.square() / u_diag.square(), pattern)
    else:
        keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    if pattern.kind == "nm":
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)  # no m-group straddles two blocks

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d1 = u_diag[i1:i2]
        keep1 = keep[:, i1:i2]  # view: masks chosen below land in `keep`
        err1 = torch.zeros_like(w1)
        if pattern.kind == "unstructured":
            # Telescoping per-block counts: every row ends with exactly pruned_count(sparsity, cols) zeros.
            n_pruned = pruned_count(pattern.sparsity, i2) - pruned_count(pattern.sparsity, i1)
            keep1.copy_(keep_top_per_row(w1.square() / d1.square(), n_pruned))
        with column_loop_threads(w.device):
            for j in range(i2 - i1):
                if pattern.kind == "nm" and j % pattern.m == 0:
                    g = slice(j, j + pattern.m)
                    keep1[:, g] = keep_top_per_row(w1[:, g].square() / d1[g].square(), pattern.m - pattern.n)
                col = w1[:, j]
                q = torch.where(keep1[:, j], col, torch.zeros((), dtype=col.dtype, device=col.device))
                err = (col - q) / u1[j, j]
                w1[:, j:].addr_(err, u1[j, j:], alpha=-1.0)  # OBS: fold the pruned weights into columns j..
                w1[:, j] = q  # exactly zero where pruned (the update leaves rounding residue)
                err1[:, j] = err
        w[:, i1:i2] = w1
        if i2 < cols:
            w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1.0)  # lazy batched update of the later blocks

    pruned = w.to(weight.dtype)
    return PrunedWeight(pruned, keep, output_error(weight, pruned, hessian))


def _validate(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern | None, tokens: int, damp: float
) -> None:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D tensor (out, in), got {_shape(weight)}")
    if not isinstance(hessian, torch.Tensor) or hessian.ndim != 2:
        raise ValueError(f"hessian must be a 2-D tensor (in, in), got {_shape(hessian)}")
    if not weight.is_floating_point() or not hessian.is_floating_point():
        raise ValueError(f"weight and hessian must be floating point, got {weight.dtype}, {hessian.dtype}")
    d_in = weight.shape[1]
    if weight.numel() == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if tuple(hessian.shape) != (d_in, d_in):
        raise ValueError(f"hessian must have shape ({d_in}, {d_in}) to match weight, got {tuple(hessian.shape)}")
    if not torch.isfinite(weight).all() or not torch.isfinite(hessian).all():
        raise ValueError("weight and hessian must be finite (found NaN or inf)")
    if (torch.diagonal(hessian) < 0).any():
        raise ValueError("hessian has a negative diagonal entry; it must be sum_t x_t x_t^T (PSD)")
    if not (isinstance(tokens, numbers.Integral) and not isinstance(tokens, bool) and tokens >= 1):
        raise ValueError(f"tokens must be a positive int (calibration tokens summed into hessian), got {tokens!r}")
    if not (isinstance(damp, (int, float)) and not isinstance(damp, bool) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite float >= 0, got {damp!r}")
    if pattern is not None:
        _validate_pattern(weight, pattern)


def _validate_pattern(weight: torch.Tensor, pattern: object) -> None:
    if not isinstance(pattern, SparsityPattern):
        raise ValueError(f"pattern must be a SparsityPattern, got {type(pattern).__name__}")
    pattern.check_shape(weight.shape)


def _validate_sweep(blocksize: int, sweep_dtype: torch.dtype) -> None:
    if not (isinstance(blocksize, numbers.Integral) and not isinstance(blocksize, bool) and blocksize >= 1):
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if sweep_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"sweep_dtype must be torch.float32 or torch.float64, got {sweep_dtype}")


def _shape(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
