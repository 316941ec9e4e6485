"""Sparsity patterns of a linear layer's weight (out, in) and mask selection from per-element scores.

Three patterns:
* ``unstructured``: any ``sparsity`` fraction of the weights may be zero.
* ``nm``: at most ``n`` non-zeros in every group of ``m`` consecutive input elements of a row (2:4 is what
  sparse tensor cores accelerate); the sparsity is then ``1 - n/m``.
* ``block``: whole (rows x cols) = ``block`` tiles are zero, a ``sparsity`` fraction of the tiles
  (block-sparse kernels skip zero tiles).

Mask convention everywhere: True = kept, False = pruned; scores are "higher = keep". Counts are exact
(``pruned_count``), never threshold-based, so ties cannot change how many elements are pruned.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["KINDS", "Granularity", "SparsityPattern", "keep_top_per_row", "kept_count", "pruned_count", "select_mask"]

KINDS = ("unstructured", "nm", "block")

# Where the unstructured pruned count is enforced: every output row ("row", as Wanda and SparseGPT do) or only the
# matrix as a whole ("matrix", classic layer-wise magnitude pruning).
Granularity = Literal["row", "matrix"]

_DEFAULT_NM = (2, 4)
_DEFAULT_BLOCK = (16, 16)
# Percentages in labels: enough digits that parse(label) gives back any sparsity written with <= 8 decimals.
_PCT_FORMAT = ".10g"
_NUM = r"([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"
_UNSTRUCTURED_RE = re.compile(rf"unstructured{_NUM}")
_NM_RE = re.compile(r"([0-9]+):([0-9]+)")
_BLOCK_RE = re.compile(rf"block([0-9]+)x([0-9]+)-{_NUM}")


def pruned_count(sparsity: float, total: int) -> int:
    """Number of elements (or blocks) pruned out of ``total`` at ``sparsity``: round(sparsity * total)."""
    return min(total, max(0, round(sparsity * total)))


@dataclass(frozen=True)
class SparsityPattern:
    """A sparsity pattern; see the module docstring. Build one directly or with ``SparsityPattern.parse(label)``.

    For ``kind="nm"`` leave ``sparsity`` out (it is derived as 1 - n/m; a given value must agree). ``n``/``m``
    apply only to "nm" and ``block`` (rows, cols) only to "block": setting them for another kind is an error, so
    that equal patterns have equal labels.
    """

    kind: str
    sparsity: float = math.nan
    n: int = _DEFAULT_NM[0]
    m: int = _DEFAULT_NM[1]
    block: tuple[int, int] = _DEFAULT_BLOCK

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        for name in ("n", "m"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "m", int(self.m))
        block = self.block
        if not (isinstance(block, (tuple, list)) and len(block) == 2 and all(_is_int(b) for b in block)):
            raise ValueError(f"block must be a pair of ints (rows, cols), got {block!r}")
        object.__setattr__(self, "block", (int(block[0]), int(block[1])))  # a list would make the pattern unhashable

        if self.kind != "nm" and (self.n, self.m) != _DEFAULT_NM:
            raise ValueError(f"n and m apply only to kind='nm', got n={self.n}, m={self.m} for kind={self.kind!r}")
        if self.kind != "block" and self.block != _DEFAULT_BLOCK:
            raise ValueError(f"block applies only to kind='block', got block={self.block} for kind={self.kind!r}")

        if self.kind == "nm":
            if self.m < 1:
                raise ValueError(f"m must be >= 1, got {self.m}")
            if not 1 <= self.n <= self.m:
                raise ValueError(f"n must be in [1, m={self.m}], got {self.n}")
            derived = 1.0 - self.n / self.m
            given = self.sparsity
            if not (_is_real(given) and (math.isnan(given) or abs(float(given) - derived) <= 1e-9)):
                raise ValueError(f"sparsity for kind='nm' is 1 - n/m = {derived:g}; leave it out, got {given!r}")
            object.__setattr__(self, "sparsity", derived)
            return

        if self.kind == "block" and (self.block[0] < 1 or self.block[1] < 1):
            raise ValueError(f"block sizes must be >= 1, got block={self.block}")
        s = self.sparsity
        if not (_is_real(s) and 0.0 <= float(s) <= 1.0):
            raise ValueError(f"sparsity must be a float in [0, 1] for kind={self.kind!r}, got {s!r}")
        object.__setattr__(self, "sparsity", float(s))

    @property
    def density(self) -> float:
        """Fraction of weights kept (nominal, before rounding to whole elements/blocks)."""
        return 1.0 - self.sparsity

    @property
    def label(self) -> str:
        """Stable short name: "unstructured70", "2:4", "block16x16-50"; ``parse`` is its inverse."""
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        pct = format(100.0 * self.sparsity, _PCT_FORMAT)
        if self.kind == "unstructured":
            return f"unstructured{pct}"
        return f"block{self.block[0]}x{self.block[1]}-{pct}"

    @classmethod
    def parse(cls, label: str) -> SparsityPattern:
        """Inverse of ``label``; raises ValueError (naming the accepted forms) on anything else."""
        if not isinstance(label, str):
            raise ValueError(f"label must be a str, got {type(label).__name__}")
        text = label.strip()
        if match := _NM_RE.fullmatch(text):
            return cls("nm", n=int(match[1]), m=int(match[2]))
        if match := _UNSTRUCTURED_RE.fullmatch(text):
            return cls("unstructured", float(match[1]) / 100.0)
        if match := _BLOCK_RE.fullmatch(text):
            return cls("block", float(match[3]) / 100.0, block=(int(match[1]), int(match[2])))
        raise ValueError(
            f"label {label!r} is not a sparsity pattern; expected 'unstructured<percent>' (e.g. unstructured70), "
            f"'<n>:<m>' (e.g. 2:4) or 'block<rows>x<cols>-<percent>' (e.g. block16x16-50)"
        )

    def check_shape(self, shape: tuple[int, ...] | torch.Size) -> None:
        """Raise ValueError unless a (out, in) weight of this shape can carry the pattern exactly."""
        if len(shape) != 2:
            raise ValueError(f"pattern {self.label} needs a 2-D (out, in) tensor, got shape {tuple(shape)}")
        rows, cols = int(shape[0]), int(shape[1])
        if self.kind == "nm" and cols % self.m:
            raise ValueError(f"pattern {self.label}: in={cols} is not divisible by m={self.m}")
        if self.kind == "block" and (rows % self.block[0] or cols % self.block[1]):
            raise ValueError(f"pattern {self.label}: shape {(rows, cols)} is not divisible by block={self.block}")


def kept_count(pattern: SparsityPattern, rows: int, cols: int) -> int:
    """Weights a (rows, cols) matrix keeps under `pattern` with row granularity (what select_mask and every pruner
    here keep exactly)."""
    pattern.check_shape((rows, cols))
    if pattern.kind == "unstructured":
        return rows * (cols - pruned_count(pattern.sparsity, cols))
    if pattern.kind == "nm":
        return rows * cols // pattern.m * pattern.n
    n_blocks = (rows // pattern.block[0]) * (cols // pattern.block[1])
    return (n_blocks - pruned_count(pattern.sparsity, n_blocks)) * pattern.block[0] * pattern.block[1]


def select_mask(
    scores: torch.Tensor, pattern: SparsityPattern, *, granularity: Granularity = "row"
) -> torch.Tensor:
    """Boolean keep-mask (True = kept) of ``scores`` (out, in) for ``pattern``, keeping the highest scores.

    * unstructured: exactly ``pruned_count(sparsity, in)`` zeros in every row (granularity="row") or
      ``pruned_count(sparsity, out*in)`` in the matrix (granularity="matrix").
    * nm: the top ``n`` of every group of ``m`` consecutive columns of a row (exactly n kept per group).
    * block: the ``pruned_count(sparsity, n_blocks)`` tiles with the lowest summed score are pruned, over the
      whole matrix (tiles of different block rows compete).
    ``granularity`` only affects unstructured patterns. Ties are broken arbitrarily but counts stay exact.
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D tensor (out, in), got {_shape(scores)}")
    if granularity not in ("row", "matrix"):
        raise ValueError(f"granularity must be 'row' or 'matrix', got {granularity!r}")
    pattern.check_shape(scores.shape)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    rows, cols = scores.shape
    if pattern.kind == "unstructured":
        if granularity == "matrix":
            n_pruned = pruned_count(pattern.sparsity, rows * cols)
            return keep_top_per_row(scores.reshape(1, -1), n_pruned).reshape(rows, cols)
        return keep_top_per_row(scores, pruned_count(pattern.sparsity, cols))
    if pattern.kind == "nm":
        groups = scores.reshape(rows * cols // pattern.m, pattern.m)
        return keep_top_per_row(groups, pattern.m - pattern.n).reshape(rows, cols)
    br, bc = pattern.block
    tiles = scores.reshape(rows // br, br, cols // bc, bc).sum(dim=(1, 3))
    n_pruned = pruned_count(pattern.sparsity, tiles.numel())
    keep_tiles = keep_top_per_row(tiles.reshape(1, -1), n_pruned).reshape(tiles.shape)
    return keep_tiles.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)


def magnitude_prune(weight: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """``weight`` with the entries ``select_mask`` drops by magnitude set to zero (same dtype and device)."""
    return torch.where(select_mask(weight.abs().float(), pattern), weight, 0.0)


def keep_top_per_row(scores: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """Per row of a 2-D tensor, False at the ``n_pruned`` lowest scores, True elsewhere."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_pruned > 0:
        lowest = torch.topk(scores, n_pruned, dim=1, largest=False, sorted=False).indices
        keep.scatter_(1, lowest, False)
    return keep


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _shape(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
