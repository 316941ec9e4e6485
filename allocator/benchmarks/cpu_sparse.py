"""How a sparse unit should run on a CPU: per call, one linear of SmolLM2-135M's shapes, timed three ways.

- `dense`: the weight decompressed once (at load) and multiplied by torch's dense GEMM (what SparseLinear does on
  a CPU);
- `decompress_per_call`: the format's torch reference, which rebuilds the dense weight from the compressed
  tensors on every call (what SparseLinear did on a CPU before);
- `csr`: the same non-zeros as a torch.sparse CSR tensor (MKL's sparse x dense product), the one CPU sparse
  kernel torch ships.

Rows of x: 1 and 16 (decode), 512 (the prefill profile's 1 x 512). Per (linear, rows, pattern) the variants are
timed alternately, in a fresh shuffled order every round (profilers.timing.time_interleaved), and each variant's
time is also taken as a ratio to the dense call of the same round, so the machine's drift cancels. Medians, 10th
and 90th percentiles of every sample go to runs/bench/cpu_sparse/smollm2_linears.json, with the bytes each layout
holds in memory.

    python -m allocator.benchmarks.cpu_sparse [--repeats 15] [--warmup 3]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from allocator.benchmarks.common import spread, write_result
from allocator.core.formats import export_format
from allocator.core.patterns import SparsityPattern, select_mask
from kernels import formats
from kernels.sparse_linear import SparseLinear
from profilers.timing import time_interleaved

# SmolLM2-135M's linears (out, in): q_proj / o_proj, gate_proj / up_proj, down_proj (k/v are 192 x 576).
LINEARS = {"q_proj": (576, 576), "gate_proj": (1536, 576), "down_proj": (576, 1536)}
ROWS = (1, 16, 512)
PATTERNS = ("unstructured50", "unstructured70", "unstructured90", "2:4", "block16x16-50")


def _csr_bytes(w: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in (w.values(), w.col_indices(), w.crow_indices()))


@torch.inference_mode()
def run(repeats: int, warmup: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    rows_out = []
    for name, (out_f, in_f) in LINEARS.items():
        weight = torch.randn(out_f, in_f)
        for label in PATTERNS:
            pattern = SparsityPattern.parse(label)
            masked = weight * select_mask(weight.abs(), pattern)
            fmt, params = export_format(pattern)
            module = SparseLinear.from_dense(masked, None, fmt, **params)
            compressed = module.compressed()
            csr = masked.to_sparse_csr()
            dense_once = module.to_dense()
            assert torch.equal(dense_once, masked)
            for m in ROWS:
                x = torch.randn(m, in_f)
                reference = formats.get(fmt).reference_matmul  # decompresses on every call
                calls = {
                    "dense": lambda: F.linear(x, dense_once),
                    "decompress_per_call": lambda: reference(x, compressed),
                    "csr": lambda: torch.mm(csr, x.T).T,
                }
                expected = calls["dense"]()
                for key, call in calls.items():
                    torch.testing.assert_close(call(), expected, rtol=1e-4, atol=1e-4, msg=f"{key} disagrees")
                stats = time_interleaved(calls, warmup, repeats, desc=f"{name} {label} m={m}")
                dense_samples = np.asarray(stats["dense"].samples_ms)
                row = {
                    "linear": name, "shape": [out_f, in_f], "rows": m, "pattern": label, "format": fmt,
                    "ms": {k: spread(s.samples_ms) for k, s in stats.items()},
                    "ratio_to_dense": {
                        k: spread(list(np.asarray(s.samples_ms) / dense_samples)) for k, s in stats.items() if k != "dense"
                    },
                }
                rows_out.append(row)
                print(
                    f"{name:9s} {label:15s} m={m:3d}  dense {row['ms']['dense']['median']:.3f} ms  "
                    f"decompress/call x{row['ratio_to_dense']['decompress_per_call']['median']:.2f}  "
                    f"csr x{row['ratio_to_dense']['csr']['median']:.2f} "
                    f"[{row['ratio_to_dense']['csr']['p10']:.2f}-{row['ratio_to_dense']['csr']['p90']:.2f}]"
                )
            for row in rows_out[-len(ROWS):]:
                row["bytes"] = {
                    "dense": masked.numel() * masked.element_size(),
                    "stored_format": int(compressed.nbytes),
                    "csr": _csr_bytes(csr),
                    "dense_once_plus_stored": masked.numel() * masked.element_size() + int(compressed.nbytes),
                }
    csr_wins = [r for r in rows_out if r["ratio_to_dense"]["csr"]["median"] < 1.0]
    return {
        "dtype": "float32",
        "repeats": repeats,
        "warmup": warmup,
        "rows": rows_out,
        "csr_faster_than_dense": [f"{r['linear']} {r['pattern']} m={r['rows']}" for r in csr_wins],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    result = run(args.repeats, args.warmup)
    write_result("cpu_sparse", "smollm2_linears", result)


if __name__ == "__main__":
    main()
