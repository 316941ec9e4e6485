"""The roofline's third roof, instruction issue: the sparse kernels' warp-instructions per element (kernels/
issue_costs.json, written by the static kernel benchmark), priced at the device's issue rate, and the decode
ranking it gives agreeing with the static benchmark's predictions."""

import json
from pathlib import Path

import pytest

from allocator.core.formats import linear_work
from allocator.core.patterns import SparsityPattern
from kernels import issue_costs
from profilers.devices import DEVICES
from profilers.roofline import DTYPE, kernel_cost, linear_cost

REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "runs" / "bench" / "kernels" / "static"
SHAPES = [(4096, 14336), (4096, 4096)]  # (N out, K in), the static benchmark's


def _points(tmp_path: Path, points: dict) -> Path:
    path = tmp_path / "issue_costs.json"
    path.write_text(json.dumps({"archs": {"90": points}}))
    return path


def test_per_element_interpolates_in_m_and_density_and_picks_the_nearest_shape(tmp_path):
    pts = [{"density": d, "shape": [64, 64], "m": m, "per_element": v * d}
           for d in (0.2, 0.6) for m, v in ((1, 1.0), (4, 2.0), (16, 8.0))]
    pts += [{"density": 0.2, "shape": [4096, 4096], "m": 1, "per_element": 50.0}]
    path = _points(tmp_path, {"csr8": pts, "nm:m=4,n=2": [{"density": 0.5, "shape": [64, 64], "m": 1,
                                                            "per_element": 0.3}]})

    def at(density, m, shape=(64, 64)):
        return issue_costs.per_element("csr8", {}, 90, shape, density, m, path)

    assert at(0.2, 1) == pytest.approx(0.2) and at(0.2, 4) == pytest.approx(0.4)
    assert at(0.2, 2) == pytest.approx(0.2 + (0.4 - 0.2) / 3)  # linear between measured M
    assert at(0.2, 64) == pytest.approx(8.0 * 0.2 * 64 / 16)  # above the largest M: in proportion to M
    assert at(0.4, 4) == pytest.approx(2.0 * 0.4)  # linear between measured densities
    assert at(0.05, 1) == pytest.approx(0.2) and at(0.9, 1) == pytest.approx(0.6)  # clamped to the measured range
    assert at(0.2, 1, (128, 96)) == pytest.approx(0.2)  # nearest shape by element count: 64x64, not 4096x4096
    assert at(0.2, 1, (2048, 4096)) == 50.0
    assert issue_costs.per_element("nm", {"n": 2, "m": 4}, 90, (64, 64), 0.5, 1, path) == 0.3
    assert issue_costs.per_element("nm", {"n": 1, "m": 4}, 90, (64, 64), 0.25, 1, path) is None  # not measured
    assert issue_costs.per_element("csr8", {}, 80, (64, 64), 0.2, 1, path) is None  # nor on another arch
    assert issue_costs.warp_instructions("csr8", {}, 90, (64, 64), 64 * 64 // 5, 4, path) == pytest.approx(
        0.4 * 64 * 64)
    assert issue_costs.kernel_key("bsr", {"block": (16, 16)}) == "bsr:block=16x16"


def test_a_kernel_with_many_instructions_per_element_is_issue_bound():
    h200 = DEVICES["h200"]
    assert h200.issue_rate == 132 * 4 * 1.98e9
    nbytes, flops = 1e8, 1e9  # 20.8 us of bytes, 1 ns of tensor FLOPs
    assert kernel_cost(h200, nbytes, flops).bound == "memory"
    few = kernel_cost(h200, nbytes, flops, instructions=1e6)  # 1 us of issue: still bytes
    many = kernel_cost(h200, nbytes, flops, instructions=1e8)  # 96 us of issue
    assert few.seconds == kernel_cost(h200, nbytes, flops).seconds and few.bound == "memory"
    assert many.bound == "issue" and many.seconds == pytest.approx(1e8 / h200.issue_rate + h200.launch_s)
    # Bitmap's decode loop issues a fixed ~0.37 warp-instructions per dense element on sm_90, whatever the sparsity:
    # at 90% it is issue-bound; csr8 works per stored value and stays bound by its bytes at 70%.
    bitmap = linear_cost(h200, SparsityPattern.parse("unstructured90"), 1, 14336, 4096)
    work = linear_work(SparsityPattern.parse("unstructured90"), 1, 4096, 14336, DTYPE, "bitmap", 90)
    assert bitmap.bound == "issue" and bitmap.instructions == work.warp_instructions > 0.3 * 4096 * 14336
    assert linear_cost(h200, SparsityPattern.parse("unstructured70"), 1, 14336, 4096, "csr8").bound == "memory"
    # Dense GEMMs (cuBLAS) and CPUs have no issue roof.
    assert linear_work(None, 1, 4096, 4096, DTYPE, arch=90).warp_instructions == 0
    assert DEVICES["cpu-generic"].issue_rate == 0
    assert linear_work(SparsityPattern.parse("2:4"), 1, 4096, 4096, DTYPE, arch=0).warp_instructions == 0


def test_every_gpu_profile_has_issue_costs_for_every_default_kernel():
    data = issue_costs.load()
    for spec in DEVICES.values():
        if spec.is_gpu:
            assert spec.sms > 0 and spec.clock_hz > 0
            kernels = data["archs"][str(spec.arch)]
            assert {"bitmap", "csr8", "nm:m=4,n=2", "nm:m=8,n=4", "bsr:block=16x16"} <= set(kernels)


@pytest.mark.parametrize("device_key", ["h100", "h200", "a100"])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_ranking_csr8_above_bitmap_through_batch_4_at_70_percent(device_key, shape):
    device, (n, k) = DEVICES[device_key], shape
    pattern = SparsityPattern.parse("unstructured70")

    def seconds(fmt: str, m: int) -> float:
        return linear_cost(device, pattern, m, k, n, fmt).seconds

    for m in (1, 2, 4):
        assert seconds("csr8", m) < seconds("bitmap", m), m
    # the crossover lies between 4 and 16 rows: at 8 it depends on the device and the shape (the split-K targets
    # measured on an H200 made bitmap's launch cost more instructions per element, 0.371 -> 0.419 at 4096x14336)
    assert seconds("bitmap", 16) < seconds("csr8", 16)


@pytest.mark.parametrize("arch", [90, 80])
def test_roofline_ranks_unstructured_formats_as_the_static_benchmark_predicts(arch):
    """Per shape, sparsity and M (1 and 16) of the static benchmark's own table (runs/bench/kernels/static), the
    roofline (launch included) prices cheaper the format the static benchmark predicts faster; and N:M is priced
    from its own kernel: its kernel time (the roofline's, less the launch the static model leaves out) within 10%
    of the static prediction (which also counts split-K partial sums)."""
    result = json.loads((STATIC / f"sm{arch}.json").read_text())
    device = DEVICES[result["device_rates"]["profile"]]
    rows = {(r["variant"], tuple(r["shape"]), r["m"]): r for r in result["rows"]}
    checked = 0
    for (variant, shape, m), row in rows.items():
        if not variant.startswith("csr8-") or m > 16:
            continue
        pct = variant.removeprefix("csr8-")
        static_csr8_faster = row["predicted_speedup_vs_cublas"] > rows[(f"bitmap{pct}", shape, m)][
            "predicted_speedup_vs_cublas"]
        pattern = SparsityPattern.parse(f"unstructured{pct}")
        costs = {fmt: linear_cost(device, pattern, m, shape[1], shape[0], fmt).seconds for fmt in ("bitmap", "csr8")}
        assert (costs["csr8"] < costs["bitmap"]) == static_csr8_faster, (variant, shape, m, costs)
        checked += 1
    assert checked == 12
    for (variant, shape, m), row in rows.items():
        if variant in ("nm2:4", "nm4:8") and m <= 16:
            pattern = SparsityPattern.parse(variant.removeprefix("nm"))
            speedup = ((linear_cost(device, None, m, shape[1], shape[0]).seconds - device.launch_s)
                       / (linear_cost(device, pattern, m, shape[1], shape[0]).seconds - device.launch_s))
            assert speedup == pytest.approx(row["predicted_speedup_vs_cublas"], rel=0.1), (variant, shape, m)
