"""Reading NVIDIA SASS (the text `cuobjdump -sass` prints) without a GPU: instructions, the hot loop, counts by kind.

`parse` turns the listing into `Instruction`s (address, predicate, opcode with its modifiers, operands); `hot_loop`
finds the kernel's main loop by its backward branch (a BRA whose target lies at or before it; the widest such range
is the outermost loop) and `census` counts what the issue budget of a loop depends on: barriers (BAR), warp
shuffles (SHFL), shared-memory traffic (LDS / STS / LDSM), and whether cp.async (LDGSTS), TMA (UTMALDG) or wgmma
(HGMMA) appear. Static counts only: a predicated-off instruction is still issued, and branches inside the loop body
(taken or not) are counted as if every instruction ran once per trip."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

# "        /*0110*/              @!P0 BRA 0x2580 ;    /* 0x... */"
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")

SHARED_OPS = ("LDS", "STS", "LDSM", "STSM")
FEATURES = {"cp_async": ("LDGSTS",), "tma": ("UTMALDG", "UBLKCP"), "wgmma": ("HGMMA",)}


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. "SHFL.BFLY.PT"
    operands: str
    predicate: str = ""

    @property
    def base(self) -> str:
        """The opcode without modifiers: "SHFL"."""
        return self.opcode.split(".", 1)[0]

    @property
    def branch_target(self) -> int | None:
        """The target address of a BRA with an immediate target, else None."""
        if self.base != "BRA":
            return None
        match = re.search(r"0x([0-9a-f]+)", self.operands)
        return int(match[1], 16) if match else None


def parse(sass: str) -> list[Instruction]:
    """Every instruction of a `cuobjdump -sass` listing (one kernel), in address order."""
    out = []
    for line in sass.splitlines():
        match = _LINE.match(line)
        if match:
            address, predicate, opcode, operands = match.groups()
            out.append(Instruction(int(address, 16), opcode, operands.strip(), (predicate or "").strip()))
    return out


@dataclass(frozen=True)
class Loop:
    start: int  # address of the first instruction of the body (the branch target)
    end: int  # address of the backward branch
    body: tuple[Instruction, ...]
    backward_branches: int  # in the whole kernel; > 1 means nested or several loops


def hot_loop(instructions: list[Instruction]) -> Loop | None:
    """The outermost loop: the widest [target, branch] range of a backward branch (a branch to itself, the
    trailing `BRA` idle loop every kernel ends with, is not a loop). None when the code has no backward branch."""
    backward = [(i.branch_target, i.address) for i in instructions
                if i.branch_target is not None and i.branch_target < i.address]
    if not backward:
        return None
    start, end = max(backward, key=lambda r: r[1] - r[0])
    body = tuple(i for i in instructions if start <= i.address <= end)
    return Loop(start, end, body, len(backward))


def inner_loop(instructions: list[Instruction], outer: Loop) -> Loop | None:
    """The widest loop strictly inside `outer` (a loop nested in the hot loop, e.g. a data-dependent walk per
    outer trip), or None."""
    inside = [(i.branch_target, i.address) for i in instructions
              if i.branch_target is not None and outer.start <= i.branch_target < i.address < outer.end]
    if not inside:
        return None
    start, end = max(inside, key=lambda r: r[1] - r[0])
    return Loop(start, end, tuple(i for i in instructions if start <= i.address <= end), outer.backward_branches)


def census(instructions: list[Instruction] | tuple[Instruction, ...]) -> dict[str, int]:
    """Instruction counts by kind: total, barriers, shuffles, shared-memory ops, global loads / stores, and the
    opcodes that mark cp.async, TMA and wgmma."""
    bases = [i.base for i in instructions]
    counts = {
        "instructions": len(bases),
        "bar": sum(b == "BAR" for b in bases),
        "shfl": sum(b == "SHFL" for b in bases),
        "shared": sum(b in SHARED_OPS for b in bases),
        "ldg": sum(b in ("LDG", "LDGSTS") for b in bases),
        "stg": sum(b in ("STG", "RED", "ATOM", "ATOMG", "REDG") for b in bases),
    }
    for feature, opcodes in FEATURES.items():
        counts[feature] = sum(b in opcodes for b in bases)
    return counts


def cuobjdump() -> Path:
    """The `cuobjdump` shipped in the Triton wheel (triton/backends/nvidia/bin)."""
    import triton  # only this helper needs triton's install path

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"no cuobjdump at {path}: the installed triton wheel does not ship it")
    return path


def disassemble(cubin: bytes, workdir: Path, cache_dir: Path | None = None) -> str:
    """`cuobjdump -sass` of a cubin (written to `workdir`); with `cache_dir`, kept there by the cubin's hash (the
    disassembly, ~0.5 s a kernel, is most of a warm static benchmark's time)."""
    cached = cache_dir / f"{hashlib.sha256(cubin).hexdigest()}.sass" if cache_dir is not None else None
    if cached is not None and cached.exists():
        return cached.read_text()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    done = subprocess.run([str(cuobjdump()), "-sass", str(path)], capture_output=True, text=True, check=True)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(done.stdout)
        tmp.replace(cached)
    return done.stdout


def resource_usage(cubin: bytes, workdir: Path) -> dict[str, int]:
    """Registers, stack (spill) and shared bytes per `cuobjdump -res-usage`: {"reg", "stack", "shared", "local"}."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    done = subprocess.run([str(cuobjdump()), "-res-usage", str(path)], capture_output=True, text=True, check=True)
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", done.stdout)
    if not match:
        raise ValueError(f"cuobjdump -res-usage: no REG/STACK/SHARED/LOCAL line in {done.stdout!r}")
    return dict(zip(("reg", "stack", "shared", "local"), (int(v) for v in match.groups())))
