"""Whether a CPU latency table describes this machine: each regime's round-to-round spread, a dense re-check at its
start and end, the CPU other processes used meanwhile, and the table's own consistency (a fixed cost clipped to 0).

A table measured while other jobs loaded the cores looks plausible but is not: on this 2-core machine one was
10x slow (dense 10,602 ms against 1,110 ms quiet) with its fixed cost clipped to 0, so every plan it produced was
predicted to run in a fraction of its real time and any speedup looked reachable. `measure_checked` therefore
re-measures a regime that fails a check (`profile.retries` times), then refuses it with one line saying why, unless
`profile.allow_unstable=true` keeps it, marked unstable (a later run without that flag measures it again).
A degenerate regime (fixed cost clipped to 0) is never saved as clean; it predicts 0 ms for the all-cheapest model,
so profilers/prediction.py refuses budgets on such a table instead of finding every speedup reachable.

Thresholds (each the reason a regime is re-measured; README "Latency tables you can trust" gives the figures):
- OTHERS_SPARE_CORES: other processes may use at most this much CPU beyond the cores our threads leave free.
  On a machine with as many cores as torch threads (this one, and the 2-core CI VM) that means 0.25 core: a quiet
  machine's background (kernel threads, the shell) stays below 0.05 core, while one busy loop takes about 1 core
  and slows every multi-threaded op, because torch's threads wait for the one that was preempted.
- MAX_DENSE_SPREAD: (p90 - p10) / median of the dense time over the rounds. Costs are per-round fractions of the
  dense time, so steady drift cancels; a spread this large means bursts that do not.
- MAX_FRACTION_SPREAD: the same spread of each variant's per-round fraction of dense (median over variants), the
  numbers the table is made of.
- MAX_RECHECK_DRIFT: the dense model timed again at the end of the regime against its start.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from allocator.core.errors import UserInputError
from profilers.table import RegimeCosts

log = logging.getLogger(__name__)

OTHERS_SPARE_CORES = 0.25
MAX_DENSE_SPREAD = 0.5
MAX_FRACTION_SPREAD = 0.5
MAX_RECHECK_DRIFT = 0.25
RECHECK_CALLS = 3  # dense calls timed at each end of a regime
RECHECK_WARMUP = 2  # untimed dense calls before each re-check, at least,
# and for at least this long. Freeing the previous regime's (or this regime's) variant models leaves the next dense
# calls slow for longer than two fast calls last, as their memory is faulted back in: on a quiet machine, a fresh
# clone's Quickstart saw SmolLM2's decode_b1 re-check at 57-59 ms at the start against 40-41 ms at the end after 2
# warm-up calls, and, with this warm-up at the start only, 40 ms at the start against 88-115 ms at the end.
RECHECK_WARMUP_S = 2.0
QUIET_WINDOW_S = 1.0  # how long one look at the other processes' CPU use lasts (wait_for_quiet)
QUIET_WINDOWS = 2  # consecutive quiet looks before measuring: one quiet second between two bursts is not quiet

_PROC_STAT = Path("/proc/stat")
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (guest time is inside user)


@dataclass(frozen=True)
class CpuSample:
    wall_s: float
    busy_s: Optional[float]  # CPU-seconds the cores this process may run on were busy (None: /proc/stat unreadable)
    own_s: float  # this process's CPU-seconds, all threads, and its waited-for children's


def cpu_sample(stat: Path = _PROC_STAT) -> CpuSample:
    # Our own CPU includes finished child processes' (profile=llamacpp times llama-bench subprocesses); a torch
    # profile has none, so its figure is unchanged.
    wall, own = time.monotonic(), sum(os.times()[:4])
    try:
        cpus = os.sched_getaffinity(0)
        hz = os.sysconf("SC_CLK_TCK")
        busy = 0
        for line in stat.read_text().splitlines():
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                busy += sum(int(values[i]) for i in _BUSY_FIELDS if i < len(values))
        return CpuSample(wall, busy / hz, own)
    except (OSError, AttributeError, ValueError, IndexError):
        return CpuSample(wall, None, own)


def others_cores(start: CpuSample, end: CpuSample) -> Optional[float]:
    """Cores kept busy by other processes (and by the hypervisor, as steal) on our cores between two samples."""
    wall = end.wall_s - start.wall_s
    if start.busy_s is None or end.busy_s is None or wall <= 0:
        return None
    return max(0.0, (end.busy_s - start.busy_s) - (end.own_s - start.own_s)) / wall


def others_limit(threads: int, cores: int) -> float:
    """Cores other processes may use while a regime is measured (OTHERS_SPARE_CORES beyond the ones we leave free)."""
    return max(0.0, cores - threads) + OTHERS_SPARE_CORES


def wait_for_quiet(
    threads: int,
    cores: int,
    max_wait_s: float,
    sample: Callable[[], CpuSample] = cpu_sample,
    sleep: Callable[[float], None] = time.sleep,
) -> Optional[float]:
    """Wait, up to `max_wait_s`, until other processes have left our cores quiet for QUIET_WINDOWS windows in a row;
    returns the others' cores in the last window (None where /proc/stat is unreadable: nothing to wait for).
    Runs started together on one cache are the common case: one measures the table under its lock while the others
    are still importing torch and loading the model, then wait idle on the lock, so a few seconds' wait turns a
    refused table into a clean one. On a machine that stays busy it measures after `max_wait_s`, and the checks
    decide."""
    limit, quiet, used = others_limit(threads, cores), 0, None
    deadline = time.monotonic() + max_wait_s
    announced = False
    while quiet < QUIET_WINDOWS:
        start = sample()
        sleep(QUIET_WINDOW_S)
        used = others_cores(start, sample())
        if used is None:
            return None
        quiet = quiet + 1 if used <= limit else 0
        if quiet < QUIET_WINDOWS and time.monotonic() >= deadline:
            break
        if quiet == 0 and not announced:
            log.info("latency table: other processes use %.2f cores (limit %.2f); waiting up to %.0f s for them",
                     used, limit, max_wait_s)
            announced = True
    return used


def _rel(samples: np.ndarray) -> tuple[float, float]:
    """p10 and p90 over the median."""
    median = float(np.median(samples))
    return float(np.percentile(samples, 10)) / median, float(np.percentile(samples, 90)) / median


def spread_of(raw: dict[str, dict]) -> dict:
    """Round-to-round spread of a regime's timings (TimingStats fields per variant, samples in round order): the dense
    time's p10 and p90 over its median, and the same of each variant's per-round fraction of dense (median over
    variants, and the widest variant)."""
    dense = np.asarray(raw["dense"]["samples_ms"], dtype=float)
    out = {"rounds": len(dense)}
    out["dense_p10"], out["dense_p90"] = _rel(dense)
    fractions = [_rel(np.asarray(s["samples_ms"], dtype=float) / dense) for name, s in raw.items() if name != "dense"]
    if fractions:
        lows, highs = np.array([f[0] for f in fractions]), np.array([f[1] for f in fractions])
        widths = highs - lows
        out["variants_p10"], out["variants_p90"] = float(np.median(lows)), float(np.median(highs))
        out["variants_widest"] = float(widths.max())
    return out


def degenerate_reasons(costs: RegimeCosts) -> list[str]:
    """Why a regime's costs cannot describe any machine: a fixed cost of 0 (clipped: the cheapest variants together
    measured faster than the parts they remove allow) or no dense time. Every unit's cheapest option costs 0, so
    such a table predicts 0 ms for the all-cheapest model: every speedup looks reachable, and speedups divide by 0."""
    reasons = []
    if not costs.dense_ms > 0:
        reasons.append(f"dense time {costs.dense_ms:.3f} ms")
    if not costs.fixed_ms > 0:
        reasons.append("fixed cost clipped to 0 ms (the cheapest variants measured faster than possible)")
    return reasons


@dataclass
class Checks:
    """What one measured regime is judged by (recorded in the table as RegimeCosts.stability)."""

    spread: dict
    recheck_start_ms: float  # dense, before the rounds
    recheck_end_ms: float  # dense, after them
    others_cores: Optional[float]  # cores other processes used meanwhile (None where /proc/stat is not readable)
    threads: int
    cores: int
    reasons: list[str] = field(default_factory=list)

    @property
    def recheck_drift(self) -> float:
        return self.recheck_end_ms / self.recheck_start_ms - 1.0


def judge(checks: Checks, costs: RegimeCosts) -> list[str]:
    """Every reason the regime does not describe a quiet machine, worded for a one-line error (empty: it does)."""
    s = checks.spread
    reasons = []
    limit = others_limit(checks.threads, checks.cores)
    if checks.others_cores is not None and checks.others_cores > limit:
        reasons.append(f"other processes used {checks.others_cores:.2f} of {checks.cores} cores "
                       f"(torch runs {checks.threads} threads; limit {limit:.2f})")
    dense_spread = s["dense_p90"] - s["dense_p10"]
    if dense_spread > MAX_DENSE_SPREAD:
        reasons.append(f"dense time varied {dense_spread * 100:.0f}% across rounds (p10-p90 over median; "
                       f"limit {MAX_DENSE_SPREAD * 100:.0f}%)")
    if "variants_p90" in s and s["variants_p90"] - s["variants_p10"] > MAX_FRACTION_SPREAD:
        reasons.append(f"variants' fractions of dense varied {(s['variants_p90'] - s['variants_p10']) * 100:.0f}% "
                       f"across rounds (limit {MAX_FRACTION_SPREAD * 100:.0f}%)")
    if abs(checks.recheck_drift) > MAX_RECHECK_DRIFT:
        reasons.append(f"dense re-check {checks.recheck_start_ms:.1f} ms at the start vs {checks.recheck_end_ms:.1f} "
                       f"ms at the end ({checks.recheck_drift * 100:+.0f}%; limit ±{MAX_RECHECK_DRIFT * 100:.0f}%)")
    if all(v <= 0 for curve in costs.unit_ms.values() for v in curve.values()):
        reasons.append("every unit costs 0 ms (no option measured faster than the cheapest)")
    return reasons + degenerate_reasons(costs)


def _dense_ms(call: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def _warm_up(call: Callable[[], object], seconds: float) -> None:
    """Untimed dense calls, RECHECK_WARMUP of them and for `seconds` at least, before a re-check: the first calls
    after a regime's variants are built or freed fault their memory in."""
    end = time.perf_counter() + seconds
    calls = 0
    while calls < RECHECK_WARMUP or time.perf_counter() < end:
        call()
        calls += 1


def measure_checked(
    name: str,
    measure: Callable[[], RegimeCosts],
    dense_call: Callable[[], object],
    threads: int,
    retries: int,
    allow_unstable: bool,
    quiet_wait_s: float = 0.0,
    sample: Callable[[], CpuSample] = cpu_sample,
    warmup_s: float = RECHECK_WARMUP_S,
) -> RegimeCosts:
    """`measure()` with its checks recorded in `stability`, each attempt after waiting up to `quiet_wait_s` for the
    other processes to leave the cores quiet; re-measured up to `retries` times while a check fails, then refused
    (UserInputError) or, with `allow_unstable`, kept marked unstable (a degenerate one too: budgets
    on it are then refused by profilers/prediction.py, since it predicts 0 ms)."""
    if retries < 0:
        raise UserInputError(f"profile.retries={retries} must be >= 0")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    best: tuple[tuple, RegimeCosts, Checks] | None = None  # the attempt kept if none is clean
    for attempt in range(1, retries + 2):
        if quiet_wait_s > 0:
            wait_for_quiet(threads, cores, quiet_wait_s, sample)
        _warm_up(dense_call, warmup_s)
        before = sample()
        start_ms = _dense_ms(dense_call, RECHECK_CALLS)
        costs = measure()
        _warm_up(dense_call, warmup_s)  # measure() has just freed its variants: the next calls fault memory back in
        end_ms = _dense_ms(dense_call, RECHECK_CALLS)
        checks = Checks(spread_of(costs.raw), start_ms, end_ms, others_cores(before, sample()), threads, cores)
        checks.reasons = judge(checks, costs)
        record = {**asdict(checks), "recheck_drift": checks.recheck_drift, "attempts": attempt,
                  "stable": not checks.reasons}
        costs = replace(costs, stability=record)
        if not checks.reasons:
            return costs
        s = checks.spread
        rank = (bool(degenerate_reasons(costs)), s.get("variants_p90", 1.0) - s.get("variants_p10", 1.0))
        if best is None or rank < best[0]:
            best = (rank, costs, checks)
        if attempt <= retries:
            log.warning("latency table, regime %s, attempt %d of %d: the machine looks busy or unstable (%s); "
                        "measuring again", name, attempt, retries + 1, "; ".join(checks.reasons))
    _, costs, checks = best  # the least degenerate, then least spread, of the attempts
    why = "; ".join(checks.reasons)
    if allow_unstable:
        log.warning("latency table, regime %s: kept although measured on a busy or unstable machine (%s), marked "
                    "unstable (profile.allow_unstable=true)", name, why)
        return costs
    raise UserInputError(
        f"latency table not saved: regime {name} was measured on a busy or unstable machine after {retries + 1} "
        f"attempt(s): {why}. Stop the other jobs and run the same command again, or set profile.allow_unstable=true "
        "to keep it marked unstable"
    )


def unstable_regimes(regimes: dict[str, RegimeCosts]) -> list[str]:
    """Regimes kept although a check failed (or measured before checks were recorded)."""
    return [name for name, costs in regimes.items() if not (costs.stability or {}).get("stable", False)]
