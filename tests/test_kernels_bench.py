"""The GPU kernel benchmark: without CUDA it refuses clearly; its pure helpers (roofline ideal, timing summaries,
pruning patterns, file naming, plot) are checked on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from allocator.benchmarks import kernels as kb
from allocator.core.errors import UserInputError
from kernels import bsr, nm
from profilers.devices import DEVICES


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_main_refuses_without_cuda(capsys):
    with pytest.raises(UserInputError, match="CUDA"):
        kb.main(quick=True)
    with pytest.raises(SystemExit) as exit_info:
        kb.cli(["--quick"])
    assert exit_info.value.code == 2
    assert "CUDA" in capsys.readouterr().err


def test_roofline_ideal_speedup():
    # 2:4 in fp16 stores 2 values + 2 two-bit indices per 4 elements: 4.5 B per 8 B dense.
    w = nm.compress(kb.pruned_weight(torch.randn(64, 128).half(), kb.Spec("triton-nm-2:4", "2:4", 0.5)), 2, 4)
    dense_bytes = 64 * 128 * 2
    assert kb.roofline_ideal_speedup(dense_bytes, w.nbytes) == pytest.approx(8 / 4.5)
    # Activations are read and written by both, so they pull the ideal toward 1.
    with_act = kb.roofline_ideal_speedup(dense_bytes, w.nbytes, kb.activation_bytes(16, 64, 128))
    assert 1 < with_act < 8 / 4.5
    assert kb.roofline_ideal_speedup(100, 100) == 1.0
    for bad in ((0, 10), (10, 0), (10, 10, -1)):
        with pytest.raises(ValueError):
            kb.roofline_ideal_speedup(*bad)


def test_dense_memory_bound():
    h100 = DEVICES["h100"]
    assert kb.dense_memory_bound(1, 4096, 14336, h100.bandwidth, h100.flops) is True
    assert kb.dense_memory_bound(1024, 4096, 14336, h100.bandwidth, h100.flops) is False
    assert kb.dense_memory_bound(1, 4096, 4096, None, None) is None


def test_summarise_and_paired_speedup():
    s = kb.summarise([float(v) for v in range(1, 12)])  # 1..11
    assert s == {"median": 6.0, "p10": 2.0, "p90": 10.0, "n": 11}
    p = kb.paired_speedup([10.0, 20.0, 30.0], [5.0, 10.0, 10.0])
    assert p["median"] == 2.0 and p["n"] == 3 and p["p90"] == 3.0
    with pytest.raises(ValueError):
        kb.paired_speedup([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        kb.summarise([])


def test_variants_settings_and_names():
    specs = kb.variant_specs(kb.SPARSITIES)
    assert specs[0].kernel == kb.BASELINE
    assert {s.sparsity for s in specs if s.fmt == "2:4"} == {0.5}
    assert {s.sparsity for s in specs if s.fmt in ("bitmap", "csr8", "bsr")} == set(kb.SPARSITIES)
    assert len({s.label for s in specs}) == len(specs)
    assert not [s for s in kb.variant_specs((0.7,)) if s.fmt == "2:4"]
    full, quick = kb.settings(False), kb.settings(True)
    assert full.ms == (1, 4, 16, 64, 256, 1024) and len(full.shapes) == 6
    assert kb.PLOT_SHAPE in full.shapes.values() and kb.PLOT_SHAPE in quick.shapes.values()
    assert kb.result_name("NVIDIA H100 80GB HBM3", False) == "NVIDIA_H100_80GB_HBM3"
    assert kb.result_name("NVIDIA H100 80GB HBM3", True) == "NVIDIA_H100_80GB_HBM3-quick"
    rounds = kb.interleaved_schedule(["a", "b", "c"], 4, seed=1)
    assert rounds == kb.interleaved_schedule(["a", "b", "c"], 4, seed=1) and all(sorted(r) == ["a", "b", "c"] for r in rounds)


def test_pruning_patterns_are_exact():
    w = torch.randn(32, 128).half()
    u = kb.pruned_weight(w, kb.Spec("triton-bitmap", "bitmap", 0.7))
    assert ((u != 0).sum(1) == 128 - round(0.7 * 128)).all()
    two_four = kb.pruned_weight(w, kb.Spec("triton-nm-2:4", "2:4", 0.5))
    nm.compress(two_four, 2, 4)  # raises if any group of 4 kept more than 2
    assert (two_four != 0).sum() == 32 * 128 // 2
    b = kb.pruned_weight(w, kb.Spec("triton-bsr-16x32", "bsr", 0.5, (16, 32)))
    assert bsr.compress(b, (16, 32)).nnz_blocks == 4  # of 8 blocks
    assert kb.pruned_weight(w, kb.Spec(kb.BASELINE, "dense", 0.0)) is w
    for spec in kb.variant_specs((0.5,)):
        assert kb.pruned_weight(w, spec).shape == w.shape


def test_pruning_keeps_the_largest_weights_and_the_export_format():
    """The benchmarked weights are the magnitude masks every pruner and the export pick (select_mask): within each
    row, each group of 4, or over all blocks, no pruned weight outweighs a kept one; and each variant is stored in
    the format and parameters the export uses for its pattern."""
    from allocator.core.formats import export_format

    w = torch.randn(32, 128)
    for spec in kb.variant_specs((0.5, 0.7)):
        if spec.pattern is None:
            continue
        kept = kb.pruned_weight(w, spec) != 0
        a = w.abs()
        if spec.fmt == "bsr":
            br, bc = spec.block
            a = a.reshape(32 // br, br, 128 // bc, bc).sum(dim=(1, 3)).reshape(1, -1)
            kept = kept[::br, ::bc].reshape(1, -1)
        elif spec.fmt == "2:4":
            a, kept = a.reshape(-1, 4), kept.reshape(-1, 4)
        lowest_kept = torch.where(kept, a, torch.inf).min(1).values
        highest_pruned = torch.where(kept, -torch.inf, a).max(1).values
        assert (highest_pruned <= lowest_kept).all(), spec.label
        fmt, params = kb._export_format(spec)
        assert fmt == {"2:4": "nm", "bitmap": "bitmap", "csr8": "csr8", "bsr": "bsr"}[spec.fmt], spec.label
        assert params == {"2:4": {"n": 2, "m": 4}, "bitmap": {}, "csr8": {}, "bsr": {"block": spec.block}}[spec.fmt]
        if spec.fmt != "csr8":  # csr8 is an alternative format, not the export's
            assert (fmt, params) == export_format(spec.pattern), spec.label


BLOCKED = ("hydra", "optuna", "deap", "transformers")
BLOCKER = f"""
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked: a GPU machine may lack it")
sys.meta_path.insert(0, Blocked())
"""


@pytest.mark.parametrize(
    "module",
    ["kernels", "kernels.ops", "kernels.sparse_linear", "allocator.benchmarks.kernels",
     "allocator.benchmarks.kernel_static"],
)
def test_the_kernel_path_imports_with_app_frameworks_absent(module):
    """The kernels and the kernel benchmarks import in a fresh interpreter where Hydra, Optuna, DEAP and
    transformers cannot be imported at all (a finder raises ImportError for them), and load none of them."""
    code = BLOCKER + f"import {module}\nprint([m for m in {BLOCKED!r} if m in sys.modules])"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("module", [*BLOCKED, "allocator.app.config"])
def test_the_import_blocker_blocks(module):
    """The check above can fail: the same blocker refuses each blocked package, and the Hydra schemas that need one."""
    code = BLOCKER + f"import {module}"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode != 0 and "is blocked" in out.stderr


def test_plot_speedups(tmp_path):
    rows = [
        {"shape": [4096, 14336], "status": "ok", "kernel": k, "label": k, "M": m, "ideal_speedup": 1.7,
         "speedup_vs_cublas": {"median": 1.2, "p10": 1.1, "p90": 1.3}}
        for k in ("cublas-dense", "triton-nm-2:4") for m in (1, 16, 256)
    ]
    path = kb.plot_speedups(rows, (4096, 14336), tmp_path / "p.png", "test")
    assert path is not None and path.stat().st_size > 0
    assert kb.plot_speedups(rows, (576, 576), tmp_path / "q.png", "none") is None


def test_bench_shape_bookkeeping_on_cpu():
    # The whole per-shape loop with the Triton kernels interpreted and a wall-clock sampler: every variant gets a
    # row; torch's 2:4 (CUDA only) is skipped with its reason; the others are correct and carry their numbers.
    cfg = kb.Settings(True, {"tiny": (64, 128)}, (1,), (0.5,), repeats=2, warmup_rounds=1)
    rows = kb.bench_shape("tiny", 64, 128, cfg, (None, None), l2_bytes=0, device="cpu", sampler=kb.wall_clock_sampler)
    by_kernel = {r["kernel"]: r for r in rows}
    assert len(rows) == len(kb.variant_specs((0.5,)))
    for name in ("torch-2:4-cusparselt", "torch-2:4-cutlass"):
        assert by_kernel[name]["status"] == "skipped" and by_kernel[name]["reason"]
    for name in ("cublas-dense", "triton-nm-2:4", "triton-bitmap", "triton-csr8", "triton-bsr-16x16",
                 "triton-bsr-32x32"):
        row = by_kernel[name]
        assert row["status"] == "ok", row
        assert row["us"]["n"] == 2 and row["speedup_vs_cublas"]["n"] == 2 and row["copies"] == 1
        assert row["fraction_of_ideal"] == pytest.approx(row["speedup_vs_cublas"]["median"] / row["ideal_speedup"])
    assert by_kernel["cublas-dense"]["ideal_speedup"] == 1.0
    assert by_kernel["triton-nm-2:4"]["weight_bytes"] == 64 * 128 * 9 // 8


def test_fixed_configs_are_the_autotuners_first_candidates():
    from kernels import bsr, nm

    assert kb.fixed_config("nm", {"n": 2, "m": 4}, 1) is None  # decode: the op's one-warp kernel, not autotuned
    assert kb.fixed_config("nm", {"n": 2, "m": 4}, 16) is None  # 2:4 at 5-16 rows: the pair kernel, one launch
    for n, m_group, m in ((4, 8, 16), (2, 4, 256)):
        config = kb.fixed_config("nm", {"n": n, "m": m_group}, m)
        first = nm.candidate_configs(m, m_group)[0]
        assert config == {**first.kwargs, "num_warps": first.num_warps, "num_stages": first.num_stages}
    for m in (1, 16, 256):
        first = bsr.candidate_configs(m, (32, 32))[0]
        assert kb.fixed_config("bsr", {"block": (32, 32)}, m)["GROUP"] == first.kwargs["GROUP"]
    assert kb.fixed_config("bitmap", {}, 1) is None
    assert kb.settings(True).fixed_configs and not kb.settings(False).fixed_configs


def test_cutlass_is_skipped_off_sm8():
    assert kb.cutlass_unsupported((8, 0)) is None and kb.cutlass_unsupported((8, 9)) is None
    assert "sm_90" in kb.cutlass_unsupported((9, 0)) and "SM 8.x" in kb.cutlass_unsupported((12, 0))
    assert kb.cutlass_unsupported(None) == "no CUDA GPU"
    with pytest.raises(kb.UnsupportedShape, match="no CUDA GPU"):
        kb._semi_structured(torch.zeros(16, 16, dtype=torch.float16), cutlass=True)


def test_bench_shape_with_fixed_configs_on_cpu():
    """The quick mode's fixed N:M and BSR configs run (interpreted) and give correct results."""
    cfg = kb.Settings(True, {"tiny": (64, 128)}, (1,), (0.5,), repeats=1, warmup_rounds=0, fixed_configs=True)
    rows = kb.bench_shape("tiny", 64, 128, cfg, (None, None), l2_bytes=0, device="cpu", sampler=kb.wall_clock_sampler)
    by_kernel = {r["kernel"]: r for r in rows}
    assert "no CUDA GPU" in by_kernel["torch-2:4-cutlass"]["reason"]
    for name in ("triton-nm-2:4", "triton-bsr-16x16", "triton-bsr-32x32"):
        assert by_kernel[name]["status"] == "ok", by_kernel[name]
