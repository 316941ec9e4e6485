"""profile=llamacpp: the CPU latency table measured with llama.cpp itself (llama-bench), so a CPU user plans for the
runtime they deploy on.

The variants are the CPU profile's (profilers/cpu.py `_variants`: dense, each option of a kind in every layer, all
narrowest), each written as the `gguf` export writes it (allocator/model/engines/gguf.py, f16, with its padding), and
timed by llama-bench one invocation per variant per round, in a fresh order each round; costs are derived exactly as
the CPU profile derives them (`regime_costs`). Prefill is llama-bench's pp test of `prefill_length` tokens, decode
the mean step of a tg test of DECODE_TOKENS tokens after a context of `decode_context` tokens (batch 1: llama-bench
runs one sequence). Only structured options are priced: llama.cpp runs no sparse weights."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

from allocator.core.cache_lock import TMP_PREFIX
from allocator.core.config import ProfileConfig
from allocator.core.errors import UserInputError
from allocator.core.space import Space
from allocator.model.engines.gguf import DEFAULT_OUTTYPE, write_gguf
from allocator.model.engines.llamacpp import DECODE_TOKENS, bench_ms, default_threads
from allocator.model.engines.llamacpp_build import VERSION, llamacpp_bin
from allocator.model.surgery import build_pruned_model, leading_levels
from profilers.cpu import _variants, regime_costs
from profilers.regimes import Regime, regimes_of
from profilers.stability import measure_checked, unstable_regimes
from profilers.table import CostTable, RegimeCosts, cpu_name, load_or_measure
from profilers.timing import TimingStats, interleaved_samples

log = logging.getLogger(__name__)

NAME = "llamacpp"
RUNS_PER_SAMPLE = 3  # llama-bench -r: runs per invocation, whose median is one round's sample
METHOD = ("llama-bench per variant (f16 gguf export, padding included), one invocation per variant per round in a "
          "seeded fresh order, median of its 3 runs; costs as the cpu profile derives them")


def check_space(space: Space) -> None:
    if space.has_sparse:
        raise UserInputError(
            "profile=llamacpp prices structured options only: llama.cpp runs no sparse weights (a gguf export "
            "writes sparse units dense), so this space's sparse options would cost what dense costs; use "
            "space=structured with profile=llamacpp, or profile=cpu to price sparse options in this project's runtime"
        )


def llamacpp_regimes(cfg: ProfileConfig) -> list[Regime]:
    """The profile's regimes: prefill, and decode at batch 1 only (llama-bench generates one sequence)."""
    regimes = regimes_of(cfg)
    batched = [r.name for r in regimes if r.kind == "decode" and r.batch != 1]
    if batched:
        raise UserInputError(f"profile=llamacpp: llama-bench decodes one sequence; regimes {', '.join(batched)} "
                             "cannot be measured; set profile.decode_batches=[1]")
    if cfg.prefill_batch != 1:
        raise UserInputError(f"profile=llamacpp: profile.prefill_batch={cfg.prefill_batch}; llama-bench prefills "
                             "one sequence, set profile.prefill_batch=1")
    return regimes


def _settings(cfg: ProfileConfig, regimes: list[Regime]) -> dict:
    """How the table is measured: part of its cache key."""
    return {"warmup": cfg.warmup, "repeats": cfg.repeats, "regimes": [asdict(r) for r in regimes],
            "decode_tokens": DECODE_TOKENS, "method": METHOD}


def fingerprint(threads: int) -> dict:
    return {"device": cpu_name(), "engine": f"llama.cpp b{VERSION.split('.')[0]}", "threads": threads,
            "dtype": DEFAULT_OUTTYPE}


def time_ggufs(paths: dict[str, Path], regime: Regime, warmup: int, repeats: int, threads: int,
               cache_dir: str | Path, desc: str) -> dict[str, TimingStats]:
    """llama-bench on each GGUF, one invocation per model per round, a seeded fresh order each round so drift
    within a round does not always land on the same model; the first `warmup` rounds are discarded. A round's
    sample is the median of the invocation's RUNS_PER_SAMPLE runs: on this shared 2-core machine single llama.cpp
    runs stall now and then (a tiny model's 128-token prefill took 0.4 ms or 470 ms), and the median drops them."""

    def sample_ms(name: str) -> float:
        runs = bench_ms(paths[name], regime.kind, regime.length, RUNS_PER_SAMPLE, threads, cache_dir)
        return float(np.median(runs))

    return interleaved_samples(list(paths), sample_ms, warmup, repeats, desc, "run")


def _write_variants(dense: nn.Module, space: Space, work: Path) -> dict[str, Path]:
    """Every variant as the gguf export writes it (timing-only vocabulary: llama-bench never tokenizes)."""
    source = leading_levels(dense, space.shape)
    paths = {}
    for name, alloc in tqdm(_variants(space, time_sparse=False).items(), desc="llama.cpp variants", unit="gguf",
                            leave=False):
        model = build_pruned_model(dense, space.shape, alloc, source)
        paths[name] = write_gguf(model, None, work / f"{name.replace('=', '-')}.gguf", DEFAULT_OUTTYPE, name)
    return paths


def profile_llamacpp(
    dense: nn.Module | None, space: Space, cfg: ProfileConfig, cache_dir: str | Path,
    first_regime: str | None = None, on_regime: Callable[[str, RegimeCosts], None] | None = None,
) -> tuple[CostTable, Path]:
    """The cached table for this CPU, llama.cpp build, model shape and options, or one measured now (regime by
    regime, each checked for stability as the cpu profile's are)."""
    check_space(space)
    regimes = {r.name: r for r in llamacpp_regimes(cfg)}
    threads = cfg.threads or default_threads()
    settings = _settings(cfg, list(regimes.values()))
    cache_dir = Path(cache_dir)
    work: list[Path] = []  # the variants' files, written once for all regimes, removed after

    def variants() -> dict[str, Path]:
        if not work:
            llamacpp_bin(cache_dir)  # built before the timing starts (once per cache)
            root = cache_dir / "engines" / "llamacpp"
            root.mkdir(parents=True, exist_ok=True)
            work.append(Path(tempfile.mkdtemp(dir=root, prefix=f"{TMP_PREFIX}variants-")))
            work.append(_write_variants(dense, space, work[0]))  # type: ignore[arg-type]
        return work[1]  # type: ignore[return-value]

    def measure(name: str) -> RegimeCosts:
        if dense is None:
            raise UserInputError("profile=llamacpp measures the model in llama.cpp: its weights must be loaded")
        regime = regimes[name]
        paths = variants()
        log.info("llama.cpp profile: regime %s (length %d), %d variants", name, regime.length, len(paths))

        def timed() -> RegimeCosts:
            stats = time_ggufs(paths, regime, cfg.warmup, cfg.repeats, threads, cache_dir, f"llama.cpp {name}")
            return regime_costs(space, regime, stats, as_dense=True)

        def dense_call() -> None:
            bench_ms(paths["dense"], regime.kind, regime.length, 1, threads, cache_dir)

        return measure_checked(name, timed, dense_call, threads, cfg.retries, cfg.allow_unstable)

    try:
        start = time.monotonic()
        args = (NAME, cache_dir, fingerprint(threads), asdict(space.shape), space.options, settings, list(regimes),
                measure)
        table, path = load_or_measure(*args, cfg.refresh, first_regime, on_regime)
        unstable = unstable_regimes(table.regimes)
        if unstable and not cfg.allow_unstable:  # kept by an earlier run with allow_unstable: not reused silently
            log.warning("latency table %s: regime(s) %s were measured on a busy machine; measuring again", path,
                        ", ".join(unstable))
            table, path = load_or_measure(*args, True, first_regime, on_regime)
        if work:
            log.info("llama.cpp profile measured in %.0f s", time.monotonic() - start)
    finally:
        if work:
            shutil.rmtree(work[0], ignore_errors=True)
    return table, path


def cached_llamacpp_table(space: Space, cfg: ProfileConfig, cache_dir: str | Path) -> tuple[CostTable, Path] | None:
    """The saved table profile_llamacpp would reuse, if any (no measurement, no build)."""
    from profilers.table import load_table, table_key

    if space.has_sparse:
        return None
    regimes = llamacpp_regimes(cfg)
    threads = cfg.threads or default_threads()
    settings = _settings(cfg, regimes)
    key = table_key(fingerprint(threads), asdict(space.shape), space.options, settings)
    path = Path(cache_dir) / "profiles" / f"{NAME}-{key}.json"
    if not path.is_file():
        return None
    table = load_table(path)
    return None if unstable_regimes(table.regimes) else (table, path)



LLAMACPP_DEVICE = f"llama.cpp b{VERSION.split('.')[0]} on {cpu_name()}"  # Measured.device of a llama.cpp verification


def export_gguf(run: Path, model: nn.Module, tokenizer, plan=None) -> Path:
    """`<run>/export/gguf/model.gguf`, written by the `gguf` export format unless a search already wrote it."""
    from allocator.model.engines import export_writer
    from allocator.model.engines.gguf import GGUF_FILE

    out = Path(run) / "export" / "gguf"
    if not (out / GGUF_FILE).is_file():
        export_writer("gguf")(model, tokenizer, out, plan)
    return out / GGUF_FILE


def time_gguf_export(run: Path, model: nn.Module, tokenizer, dense: nn.Module, regime: Regime, cfg: ProfileConfig,
                     cache_dir: str | Path) -> dict[str, TimingStats]:
    """The run's gguf export and the dense model's (written to a temporary file, timing-only vocabulary) timed by
    llama-bench alternately, `cfg.verify_repeats` rounds after `cfg.warmup`, as the table's variants were."""
    if regime.batch != 1:
        raise UserInputError(f"verifying in llama.cpp: regime {regime.name} has batch {regime.batch}; llama-bench "
                             "runs batch 1 (prefill, decode_b1)")
    pruned = export_gguf(run, model, tokenizer)
    llamacpp_bin(cache_dir)
    root = Path(cache_dir) / "engines" / "llamacpp"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f"{TMP_PREFIX}dense-") as tmp:
        dense_path = write_gguf(dense, None, Path(tmp) / "dense.gguf", DEFAULT_OUTTYPE, "dense")
        return time_ggufs({"dense": dense_path, "pruned": pruned}, regime, cfg.warmup, cfg.verify_repeats,
                          cfg.threads or default_threads(), cache_dir, f"verify in llama.cpp {regime.name}")
