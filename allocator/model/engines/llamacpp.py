"""Running llama.cpp's tools on a GGUF export: perplexity (with the tokens it scored) and llama-bench timings, and the
same perplexity protocol on a torch model, so the two are compared on identical tokens."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from allocator.model.engines.llamacpp_build import tool

log = logging.getLogger(__name__)

# Runs of llama-perplexity before its missing final line is an error (see llama_perplexity).
PERPLEXITY_ATTEMPTS = 3
DECODE_TOKENS = 32  # tokens generated per decode sample (llama-bench `-n`): one sample is their mean


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class LlamaPerplexity:
    ppl: float
    tokens: np.ndarray  # (chunks, n_ctx) int32: the tokens llama.cpp scored, chunk by chunk
    n_ctx: int
    first: int  # positions before this one are context only (llama-perplexity scores the second half)
    log: str


def _run(cmd: list[str], what: str) -> str:
    done = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return done.stdout + done.stderr


def llama_perplexity(gguf: Path, text_file: Path, n_ctx: int, cache_dir: str | Path = "runs/cache",
                     chunks: int | None = None, threads: int | None = None) -> LlamaPerplexity:
    """`llama-perplexity` on `text_file` in chunks of `n_ctx` tokens, KV cache in f32 (llama.cpp's default f16 cache
    would round K and V: the comparison is about the weights and the graph). The tokens come back from the logits
    file it writes (`--kl-divergence-base`), so the native model can be scored on exactly them."""
    for attempt in range(1, PERPLEXITY_ATTEMPTS + 1):
        with tempfile.TemporaryDirectory(prefix="llamacpp-ppl-") as tmp:
            logits = Path(tmp) / "logits.bin"
            cmd = [tool("llama-perplexity", cache_dir), "-m", gguf, "-f", text_file, "-c", n_ctx, "-b", n_ctx,
                   "-t", threads or default_threads(), "-ctk", "f32", "-ctv", "f32", "--kl-divergence-base", logits]
            if chunks is not None:
                cmd += ["--chunks", chunks]
            out = _run(cmd, "llama-perplexity")
            with logits.open("rb") as f:
                if f.read(8) != b"_logits_":
                    raise RuntimeError(f"{logits}: not a llama-perplexity logits file")
                ctx, _vocab, n_chunk = np.frombuffer(f.read(12), dtype=np.int32)  # header: n_ctx, n_vocab, n_chunk
                tokens = np.frombuffer(f.read(4 * int(n_chunk) * int(ctx)), dtype=np.int32).reshape(n_chunk, ctx)
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
        if found is not None:
            break
        # llama.cpp's logger writes from a thread it never joins (common/log.cpp, ggml-org/llama.cpp#22142), so
        # the last lines can be lost when the tool exits: run it again (deterministic: the same result).
        log.warning("llama-perplexity printed no final estimate (attempt %d of %d): its logger can drop the last "
                    "lines at exit", attempt, PERPLEXITY_ATTEMPTS)
    else:
        raise RuntimeError(f"llama-perplexity printed no final estimate in {PERPLEXITY_ATTEMPTS} runs:\n{out[-2000:]}")
    return LlamaPerplexity(float(found.group(1)), tokens.copy(), int(ctx), int(ctx) // 2, out)


@torch.inference_mode()
def chunked_perplexity(model: nn.Module, tokens: np.ndarray, first: int) -> float:
    """llama-perplexity's protocol on a torch model: each chunk evaluated alone, the next-token NLL of positions
    first..n_ctx-2 averaged over all chunks."""
    nll, count = 0.0, 0
    for chunk in tqdm(torch.from_numpy(tokens.astype(np.int64)), desc="native perplexity", unit="chunk", leave=False):
        logits = model(chunk[None]).logits[0, first:-1].float()
        nll += F.cross_entropy(logits, chunk[first + 1 :], reduction="sum").item()
        count += logits.shape[0]
    return math.exp(nll / count)


def bench_ms(gguf: Path, kind: str, length: int, repetitions: int, threads: int | None = None,
             cache_dir: str | Path = "runs/cache") -> list[float]:
    """llama-bench samples in ms: a `prefill` of `length` tokens per sample, or one `decode` step (the mean over
    DECODE_TOKENS generated tokens) after a context of `length` tokens. llama-bench warms up once, untimed."""
    if kind == "prefill":
        shape = ["-p", length, "-n", 0, "-d", 0]
    elif kind == "decode":
        shape = ["-p", 0, "-n", DECODE_TOKENS, "-d", length]
    else:
        raise ValueError(f"unknown regime kind {kind!r}; valid: prefill, decode")
    cmd = [tool("llama-bench", cache_dir), "-m", gguf, *shape, "-r", repetitions, "-t", threads or default_threads(),
           "-o", "json"]
    out = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"llama-bench failed (exit {out.returncode}): {' '.join(map(str, cmd))}\n{out.stderr[-2000:]}")
    results = json.loads(out.stdout)
    if len(results) != 1:
        raise RuntimeError(f"llama-bench returned {len(results)} results, expected 1")
    per_sample = DECODE_TOKENS if kind == "decode" else 1
    return [ns / 1e6 / per_sample for ns in results[0]["samples_ns"]]


def bench_info(cache_dir: str | Path = "runs/cache") -> dict:
    """llama.cpp's build (commit, number, backend) as llama-bench reports it, for table fingerprints and JSON."""
    from allocator.model.engines.llamacpp_build import VERSION

    return {"engine": "llama.cpp", "build": f"b{VERSION.split('.')[0]}", "tool": str(tool("llama-bench", cache_dir))}
