"""Datasheet specs of the devices a roofline latency table can be built for without the device being present."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceSpec:
    key: str  # profile name (conf/profile/<key>.yaml)
    name: str  # what torch.cuda.get_device_name() reports on it: how a measured table's fingerprint names it
    bandwidth: float  # memory bandwidth, bytes/s
    flops: float  # dense bf16/fp16 tensor throughput (fp32 accumulate), FLOP/s
    sparse_tensor_cores: bool  # 2:4 structured sparsity runs at twice the dense rate
    memory_gb: float
    # Per-kernel cost beyond its roofline (launch, ramp-up, tail), s. Not a datasheet number: ~4 µs is the usual
    # back-to-back kernel gap on recent NVIDIA GPUs in eager PyTorch; it dominates small models at batch 1. H100 and
    # H200 carry the value measured on an H200 instead.
    launch_s: float = 4e-6
    is_gpu: bool = True
    # Instruction issue (a third roof for the sparse kernels, profilers.roofline): streaming multiprocessors, max
    # boost clock (Hz) and the SASS architecture (compute capability x 10) the kernels are compiled for; the warp
    # instructions each kernel issues per weight element are measured for that architecture
    # (kernels/issue_costs.json). 0: not a GPU, no issue roof.
    sms: int = 0
    clock_hz: float = 0.0
    arch: int = 0
    # Warp schedulers per SM, each issuing one warp-instruction per clock: 4 on every NVIDIA SM since Volta (Volta,
    # Ampere, Hopper and Ada whitepapers: four processing blocks per SM, one warp scheduler each).
    schedulers_per_sm: int = 4

    @property
    def issue_rate(self) -> float:
        """Warp-instructions per second the whole GPU can issue: SMs x schedulers x clock (0 for a CPU)."""
        return self.sms * self.schedulers_per_sm * self.clock_hz


# Measured on an H200 (runs/bench/gpu/NVIDIA_H200-campaign.json, "ceilings"; python -m allocator.benchmarks.gpu_campaign):
# a bf16 linear at one row of x inside a CUDA graph, over L2-rotated weights, costs 3.15-3.18 µs beyond its bytes at
# the measured bandwidth for SmolLM2's 576x576 and 1536x576 (4.6-7.0 µs for larger ones, whose ramp and tail grow).
# The H100 is the same GH100 chip and takes the same value.
H200_LINEAR_OVERHEAD_S = 3.2e-6

DEVICES: dict[str, DeviceSpec] = {
    d.key: d
    for d in (
        # NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: 3.35 TB/s HBM3, BF16 1,979 TFLOPS with sparsity
        # (989.5 dense), 80 GB. NVIDIA Hopper architecture whitepaper: H100 SXM5 has 132 SMs, 1.98 GHz max boost
        # (the clock its 989.5 TFLOPS is quoted at); sm_90.
        DeviceSpec("h100", "NVIDIA H100 80GB HBM3", 3.35e12, 989.5e12, True, 80, launch_s=H200_LINEAR_OVERHEAD_S,
                   sms=132, clock_hz=1.98e9, arch=90),
        # NVIDIA H200 Tensor Core GPU datasheet, SXM column: 4.8 TB/s HBM3e, BF16 1,979 TFLOPS with sparsity
        # (989.5 dense), 141 GB. The same GH100 as H100 SXM5 (same 989.5 TFLOPS): 132 SMs, 1.98 GHz; sm_90.
        DeviceSpec("h200", "NVIDIA H200", 4.8e12, 989.5e12, True, 141, launch_s=H200_LINEAR_OVERHEAD_S, sms=132,
                   clock_hz=1.98e9, arch=90),
        # NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column: 2,039 GB/s HBM2e, BF16 312 TFLOPS dense
        # (624 with sparsity), 80 GB. NVIDIA A100 whitepaper: 108 SMs, 1,410 MHz boost; sm_80.
        DeviceSpec("a100", "NVIDIA A100-SXM4-80GB", 2.039e12, 312e12, True, 80, sms=108, clock_hz=1.41e9, arch=80),
        # NVIDIA L4 Tensor Core GPU datasheet: 300 GB/s GDDR6, BF16 242 TFLOPS with sparsity (121 dense), 24 GB.
        # Its 7,424 CUDA cores are 58 Ada SMs of 128 (Ada whitepaper: 128 FP32 cores per SM); 2,040 MHz max boost
        # (L4 product brief); sm_89.
        DeviceSpec("l4", "NVIDIA L4", 300e9, 121e12, True, 24, sms=58, clock_hz=2.04e9, arch=89),
        # NVIDIA Ada GPU Architecture whitepaper, appendix table for the GeForce RTX 4090: 1,008 GB/s GDDR6X, peak
        # BF16 tensor 165.2 TFLOPS with FP32 accumulate (330.4 with sparsity), 24 GB; 128 SMs, 2,520 MHz boost;
        # sm_89.
        DeviceSpec("rtx4090", "NVIDIA GeForce RTX 4090", 1.008e12, 165.2e12, True, 24, sms=128, clock_hz=2.52e9,
                   arch=89),
        # Assumed, not a datasheet: a desktop/small-server CPU with dual-channel DDR5-6400 (2 x 8 B x 6.4 GT/s =
        # 102.4 GB/s, ~100 usable), ~1 TFLOP/s achievable bf16 GEMM (8 cores with AVX-512 BF16/AMX-less FMA), no
        # 2:4 hardware, 64 GB, ~5 µs framework dispatch per op.
        DeviceSpec("cpu-generic", "generic CPU (assumed)", 100e9, 1e12, False, 64, launch_s=5e-6, is_gpu=False),
    )
}

# Outside DeviceSpec: peak FP32 FLOP/s on the CUDA cores (no tensor cores), the rate a roofline prices a scalar
# sparse kernel's FMAs at (allocator.core.formats.SCALAR_FORMATS: csr8). Datasheets: H100 and H200 SXM 67 TFLOPS
# FP32; A100 19.5; L4 30.3; Ada whitepaper, RTX 4090: 82.6. The assumed CPU has one rate (its `flops`).
CUDA_CORE_FLOPS: dict[str, float] = {"h100": 67e12, "h200": 67e12, "a100": 19.5e12, "l4": 30.3e12, "rtx4090": 82.6e12}


def scalar_flops(device: DeviceSpec) -> float:
    """FLOP/s of a kernel that multiplies without tensor cores on `device`."""
    return CUDA_CORE_FLOPS[device.key] if device.is_gpu else device.flops


# The word(s) that name each GPU's family in what torch reports ("NVIDIA H200 NVL" is an H200), matched whole and in
# order by `name_matches`.
FAMILY: dict[str, tuple[str, ...]] = {
    "h100": ("H100",), "h200": ("H200",), "a100": ("A100",), "l4": ("L4",), "rtx4090": ("RTX", "4090"),
}


def _words(name: str) -> list[str]:
    return re.findall(r"[A-Z0-9]+", name.upper())


def name_matches(expected: str, reported: str) -> bool:
    """Whether a GPU reporting `reported` (torch.cuda.get_device_name) is the device named `expected` (a
    DeviceSpec.name): the same name, or, for a known device, its family words whole and in order ("NVIDIA H200
    NVL" is an "NVIDIA H200"; "NVIDIA L40S" is not an "NVIDIA L4")."""
    if reported == expected:
        return True
    spec = next((d for d in DEVICES.values() if d.name == expected), None)
    if spec is None or spec.key not in FAMILY:
        return False
    words, family = _words(reported), [w.upper() for w in FAMILY[spec.key]]
    return any(words[i:i + len(family)] == family for i in range(len(words) - len(family) + 1))
