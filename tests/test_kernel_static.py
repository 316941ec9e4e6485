"""The static kernel benchmark (allocator.benchmarks.kernel_static), its SASS reader (profilers.sass) and GPU names
matched by family (profilers.devices.name_matches)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from profilers import sass
from profilers.devices import DEVICES, FAMILY, name_matches

REPO = Path(__file__).resolve().parent.parent

LISTING = """
	code for sm_90a
		Function : k
        /*0000*/                   LDC R1, c[0x0][0x28] ;                           /* 0x00000a00ff017b82 */
                                                                                    /* 0x000e300000000800 */
        /*0010*/              @!P0 BRA 0x90 ;                                       /* 0x0000002400188947 */
        /*0020*/                   LDG.E R2, desc[UR4][R4.64] ;                     /* 0x0 */
        /*0030*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;               /* 0x0 */
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                    /* 0x0 */
        /*0050*/                   LDS R5, [R6] ;                                   /* 0x0 */
        /*0060*/                   LDGSTS.E.BYPASS.128 [R7], desc[UR4][R8.64] ;    /* 0x0 */
        /*0070*/               @P1 BRA 0x50 ;                                       /* 0x0 */
        /*0080*/               @P2 BRA 0x20 ;                                       /* 0x0 */
        /*0090*/                   STG.E desc[UR4][R4.64], R3 ;                     /* 0x0 */
        /*00a0*/                   EXIT ;                                           /* 0x0 */
        /*00b0*/                   BRA 0xb0;                                        /* 0x0 */
"""


def test_sass_parse_loop_and_census():
    ins = sass.parse(LISTING)
    assert [i.address for i in ins] == list(range(0, 0xC0, 0x10))
    assert ins[1].predicate == "@!P0" and ins[1].branch_target == 0x90 and ins[3].base == "SHFL"
    loop = sass.hot_loop(ins)
    # Two backward branches (0x70 → 0x50 nested in 0x80 → 0x20); the self-branch at 0xb0 is no loop.
    assert (loop.start, loop.end, loop.backward_branches) == (0x20, 0x80, 2)
    counts = sass.census(loop.body)
    assert counts == {"instructions": 7, "bar": 1, "shfl": 1, "shared": 1, "ldg": 2, "stg": 0,
                      "cp_async": 1, "tma": 0, "wgmma": 0}
    assert sass.census(ins)["stg"] == 1
    assert sass.hot_loop(sass.parse(LISTING.replace("BRA 0x50", "NOP").replace("BRA 0x20", "NOP"))) is None


@pytest.mark.parametrize(
    ("expected", "reported", "match"),
    [
        ("NVIDIA H200", "NVIDIA H200", True),
        ("NVIDIA H200", "NVIDIA H200 NVL", True),
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", True),
        ("NVIDIA H100 80GB HBM3", "NVIDIA H200", False),
        ("NVIDIA H200", "NVIDIA H100 80GB HBM3", False),
        ("NVIDIA L4", "NVIDIA L40S", False),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", True),
        ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090 D", True),
        ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4080", False),
        ("some unknown GPU", "some unknown GPU 2", False),
    ],
)
def test_device_names_match_by_family(expected, reported, match):
    assert name_matches(expected, reported) is match


def test_every_gpu_profile_has_a_family_and_its_own_name_matches():
    for spec in DEVICES.values():
        if spec.is_gpu:
            assert spec.key in FAMILY and name_matches(spec.name, spec.name)
            assert sum(name_matches(other.name, spec.name) for other in DEVICES.values()) == 1


def test_cuda_device_named_and_device_present_match_by_family(monkeypatch):
    from profilers import gpu_timing, registry

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ["NVIDIA L40S", "NVIDIA H200 NVL"][i])
    assert gpu_timing.cuda_device_named("NVIDIA H200") == torch.device("cuda", 1)
    assert gpu_timing.cuda_device_named("NVIDIA L4") is None
    assert registry.device_present("h200") and not registry.device_present("h100")


def test_kernel_static_runs_one_variant(tmp_path):
    """Compiles bitmap for sm_90 at M = 1 (no GPU: Triton compiles for a target), reads its SASS, writes JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "allocator.benchmarks.kernel_static", "--arch", "90", "--only", "bitmap70",
         "--shapes", "4096x4096", "--ms", "1", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PREDICTED" in done.stdout and "bitmap70" in done.stdout
    result = json.loads((tmp_path / "sm90.json").read_text())
    assert result["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}
    assert result["triton"] and result["environment"]["gpu"] is None and "prediction" in result["note"]
    (row,) = result["rows"]
    assert (row["variant"], row["shape"], row["m"], row["dtype"]) == ("bitmap70", [4096, 4096], 1, "bfloat16")
    assert row["loop"]["instructions"] > 0 and row["loop_trips_all_programs"] > 0
    assert row["kernel_instructions"] > row["loop"]["instructions"]
    # The launch is the op's: M = 1 multiply-add (no tl.dot), one warp, split-K from the H200's 132 SMs; the
    # redesigned decode loop has no barriers, shuffles or shared memory.
    assert row["config"]["BLOCK_M"] == 1 and row["num_warps"] == 1 and row["split_k"] > 1
    assert row["loop"]["bar"] == row["loop"]["shfl"] == row["loop"]["shared"] == 0
    assert row["registers"] > 0 and row["spill_bytes"] >= 0
    for key in ("bar", "shfl", "shared"):
        assert row["loop"][key] >= 0
    assert set(row["uses"]) == {"cp_async", "tma", "wgmma"}
    assert row["instructions_per_element"] > row["loop_instructions_per_element"] > 0
    for key in ("issue_bound_us", "bytes_bound_us", "cublas_roofline_us", "predicted_speedup_vs_cublas"):
        assert row[key] > 0
    assert row["predicted_speedup_vs_cublas"] == pytest.approx(
        row["cublas_roofline_us"] / max(row["issue_bound_us"], row["bytes_bound_us"], row["compute_bound_us"]))
    _assert_issue_costs_agree(result, "bitmap")


def _assert_issue_costs_agree(result: dict, key: str) -> None:
    """The committed issue-cost file (kernels/issue_costs.json, what the roofline prices issue with) holds what this
    fresh compile counts, as the --issue-costs sweep would write it (kernel_static.issue_points)."""
    from allocator.benchmarks.kernel_static import issue_points
    from kernels import issue_costs

    data = issue_costs.load()
    assert data["triton"] == result["triton"], ("kernels/issue_costs.json was counted with another Triton: "
                                                "python -m allocator.benchmarks.kernel_static --issue-costs")
    (row,) = result["rows"]
    (point,) = issue_points(result["rows"])[key]
    stored = [p for p in data["archs"][str(result["target"]["arch"])][key]
              if (p["density"], p["shape"], p["m"]) == (point["density"], point["shape"], point["m"])]
    assert [p["per_element"] for p in stored] == [pytest.approx(row["instructions_per_element"], rel=1e-12)]


def test_inner_loop_is_the_loop_nested_in_the_hot_loop():
    ins = sass.parse(LISTING)
    outer = sass.hot_loop(ins)
    inner = sass.inner_loop(ins, outer)
    assert (inner.start, inner.end, len(inner.body)) == (0x50, 0x70, 3)
    assert sass.inner_loop(ins, inner) is None


@pytest.mark.parametrize("lanes", [1, 4])
def test_csr8_inner_trips_match_a_sampled_pattern(lanes):
    """The expected entry-loop trips (each row segment's count binomial) against counts drawn at random: per row
    group of 32 / lanes rows and 256-column segment, the most trips (lanes chunks of 4 entries) of its rows, summed."""
    from allocator.benchmarks.kernel_static import csr8_inner_trips

    n, k, density = 96, 600, 0.3  # segments of 256, 256 and 88 columns
    rows = 32 // lanes
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(200):
        stored = torch.rand(n, k, generator=gen) < density
        counts = torch.stack([stored[:, s:s + 256].sum(1) for s in range(0, k, 256)], 1)  # (n, segments)
        trips = ((counts + 3) // 4 + lanes - 1) // lanes
        draws.append(float(trips.reshape(n // rows, rows, -1).amax(1).sum()))
    sampled = sum(draws) / len(draws)
    assert csr8_inner_trips(n, k, density, lanes) == pytest.approx(sampled, rel=0.01)
    full = [64, 64, 22]  # chunks of 4 per segment at density 1
    assert csr8_inner_trips(n, k, 0.0, lanes) == 0
    assert csr8_inner_trips(n, k, 1.0, lanes) == n // rows * sum(-(-c // lanes) for c in full)


def test_csr8_decode_is_predicted_two_times_cublas(tmp_path):
    """The acceptance figure of the CSR8 decode kernel, as compiled for sm_90 by the installed Triton: at 70%
    unstructured sparsity, M = 1, 4096x14336 bf16, the static prediction is at least 2.0x cuBLAS on an H200, with
    the entry loop free of barriers, shuffles and shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "allocator.benchmarks.kernel_static", "--arch", "90", "--only", "csr8-70",
         "--shapes", "4096x14336", "--ms", "1", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "sm90.json").read_text())
    (row,) = result["rows"]
    assert row["format"] == "csr8" and row["config"]["BLOCK_M"] == 1 and row["config"]["LANES"] == 4
    assert row["split_k"] > 1
    assert row["inner_loop"]["bar"] == row["inner_loop"]["shfl"] == row["inner_loop"]["shared"] == 0
    assert row["inner_trips_all_programs"] > row["loop_trips_all_programs"]
    assert row["predicted_speedup_vs_cublas"] >= 2.0
    _assert_issue_costs_agree(result, "csr8")
