"""Scale benchmark: the level-database build and the fitness engine on random-weight models of published shapes
(time and memory depend on shapes, not on weight values).

    python -m allocator.benchmarks.scale --shape tinyllama-1.1b [--dtype bfloat16] [--device cpu|cuda|auto]
        [--space structured --mlp-step 2816 --no-drop] [--calib-sequences 8 --seq-len 128 --fisher-sequences 4]

Measures the database build's wall time and peak memory (process peak RSS from getrusage; on CUDA also
torch.cuda.max_memory_allocated), and the fitness engine's tokens per second on random candidates; writes
runs/bench/scale/<shape>-<dtype>-<device>.json. Beside the measurement it states what the pre-streaming build held
at once (every layer's input Hessians, and for sparse spaces every layer's block inputs and outputs), computed from
the shape, so the two can be compared where the old design cannot run.

The model is built on the meta device and materialised directly in its dtype (no float32 copy on the way), so the
weights cost exactly parameters x dtype bytes. Shapes "tiny" (tests) and the published ones below; llama3-8b and
llama3-70b are for a GPU (their weights alone are 16 GB and 141 GB in bf16)."""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from allocator.benchmarks.common import write_result
from allocator.core.config import SpaceConfig
from allocator.core.device import resolve_device
from allocator.core.space import ModelShape, build_space
from allocator.levels.database import has_sparse, open_or_build_database, unit_hessians
from allocator.model.loader import DTYPES
from allocator.model.offload import RandomLayers
from search.fitness_engine import StitchedKLFitness

# Published shapes (config.json of each model); vocabularies included, they set the embedding and lm_head size.
SHAPES: dict[str, dict] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256, "rope_theta": 10000.0},
    "tinyllama-1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000, "rope_theta": 10000.0},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0},
    "llama3-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0},
}


def random_model(
    shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0, layers: int | None = None, offload: bool = False
):
    """A LlamaForCausalLM of `shape` with N(0, 0.02) weights (norms 1), materialised on `device` in `dtype`; with
    `offload`, only the embedding, final norm and lm_head are (the layers come from RandomLayers one at a time)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(SHAPES[shape])
    if layers:
        kwargs["num_hidden_layers"] = layers
    config = LlamaConfig(**kwargs, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    # Offloaded: the decoder layers stay on the meta device (materialised one at a time by RandomLayers).
    parts = [model.model.embed_tokens, model.model.norm, model.lm_head] if offload else [model]
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for part in parts:
            part.to_empty(device=device)
            for name, param in part.named_parameters():
                if name.endswith("norm.weight") or part is model.model.norm:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=gen)
    # Non-persistent buffers (the rotary inverse frequencies) are computed at construction: redo it on the device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    return model.eval()


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def present_design_bytes(model_shape: ModelShape, units, calib_tokens: int, fisher_tokens: int, dtype_bytes: int) -> dict:
    """What the one-pass build (before layer streaming) held at once after its calibration pass: every unit's input
    Hessians (float64) and, for sparse units, every layer's recorded block inputs and outputs over the Fisher
    sequences. (Its full-model forward and backward activations came on top; not counted.)"""
    size = {"qkv": model_shape.hidden, "o": model_shape.hidden, "gate_up": model_shape.hidden, "down": model_shape.intermediate}
    hessians = sum(size[key] ** 2 * 8 for u in units for key in unit_hessians(u))
    calls = sum(2 * fisher_tokens * model_shape.hidden * dtype_bytes for u in units if has_sparse(u))
    per_layer = max((sum(size[k] ** 2 * 8 for u in units if u.layer == i for k in unit_hessians(u))
                     for i in range(model_shape.num_layers)), default=0)
    return {
        "hessians_bytes": hessians,
        "block_calls_bytes": calls,
        "total_bytes": hessians + calls,
        "largest_layer_hessians_bytes": per_layer,
        "arithmetic": (f"{len({u.layer for u in units})} layers x Σ over each unit's Hessian inputs of d² x 8 B "
                       f"(d = {model_shape.hidden} for qkv/o/gate_up, {model_shape.intermediate} for down) = "
                       f"{hessians / 1e9:.3f} GB; block calls 2 x {fisher_tokens} tokens x {model_shape.hidden} x "
                       f"{dtype_bytes} B per sparse unit = {calls / 1e9:.3f} GB"),
    }


def fitness_speed(model, space, db, device, vocab: int, seq_len: int, sequences: int, candidates: int, seed: int):
    """Tokens per second of the fitness engine scoring random candidates (each on `sequences` sequences)."""
    gen = torch.Generator().manual_seed(seed + 1)
    pool = torch.randint(0, vocab, (sequences, seq_len), generator=gen).to(device)
    engine = StitchedKLFitness(model, space, db.source, pool, batch_size=max(1, sequences))
    rng = np.random.default_rng(seed)
    choices = [[int(rng.integers(len(u.options))) for u in space.units] for _ in range(candidates)]
    _sync(device)
    start = time.perf_counter()
    values = engine.score(choices, sequences * seq_len)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"candidates": candidates, "tokens_per_candidate": sequences * seq_len, "seconds": seconds,
            "tokens_per_second": candidates * sequences * seq_len / seconds, "kl": values}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    rss_start = current_rss_gb()
    start = time.perf_counter()
    model = random_model(args.shape, dtype, device, args.seed, args.layers, args.offload)
    build_model_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())  # meta (offloaded) parameters counted too
    weights_gb = params * torch.finfo(dtype).bits / 8 / 1e9
    rss_model = current_rss_gb()
    shape = ModelShape.from_config(model.config)
    cfg = SpaceConfig(kind=args.space, mlp_step=args.mlp_step, allow_drop=not args.no_drop,
                      fisher_sequences=args.fisher_sequences, sparsities=args.sparsities, pruner=args.pruner)
    space = build_space(shape, cfg)
    calibration = torch.randint(0, model.config.vocab_size, (args.calib_sequences, args.seq_len),
                                generator=torch.Generator().manual_seed(args.seed))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    build = {}
    with tempfile.TemporaryDirectory(prefix="scale-db-") as cache:
        # device= exists since layer streaming; without it (timing the pre-streaming code) the build runs where the
        # model is, which is the same place.
        extra = {"device": device} if "device" in inspect.signature(open_or_build_database).parameters else {}
        if args.offload:
            extra["weights"] = RandomLayers(args.seed)
        start = time.perf_counter()
        db = open_or_build_database(model, space, calibration, f"random-{args.shape}-{args.seed}", "random-tokens",
                                    cfg, cache, batch_size=args.batch_size, **extra)
        _sync(device)
        build["seconds"] = time.perf_counter() - start
        build["peak_rss_gb"] = peak_rss_gb()
        build["peak_rss_over_weights_gb"] = build["peak_rss_gb"] - weights_gb
        if device.type == "cuda":
            build["cuda_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        build["units"] = len(space.units)
        build["database_gb"] = sum(p.stat().st_size for p in Path(db.root).rglob("*") if p.is_file()) / 1e9
        fitness = None
        if args.fitness_candidates and not args.offload:  # the fitness engine needs the whole model
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            fitness = fitness_speed(model, space, db, device, model.config.vocab_size, args.seq_len,
                                    args.fitness_sequences, args.fitness_candidates, args.seed)
            fitness["peak_rss_gb"] = peak_rss_gb()
            if device.type == "cuda":
                fitness["cuda_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    dtype_bytes = torch.finfo(dtype).bits // 8
    return {
        "shape": args.shape, "config": {**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {})},
        "dtype": args.dtype, "device": str(device), "parameters": params, "weights_gb": weights_gb,
        "rss_before_model_gb": rss_start, "rss_with_model_gb": rss_model, "build_model_seconds": build_model_s,
        "space": {"kind": args.space, "mlp_step": args.mlp_step, "allow_drop": not args.no_drop,
                  "sparsities": args.sparsities if args.space != "structured" else None, "pruner": args.pruner,
                  "options_per_unit": {u.kind: len(u.options) for u in space.units}},
        "calibration": {"sequences": args.calib_sequences, "seq_len": args.seq_len,
                        "fisher_sequences": args.fisher_sequences, "batch_size": args.batch_size},
        "database_build": build,
        "present_design_holds": present_design_bytes(shape, space.units, args.calib_sequences * args.seq_len,
                                                     args.fisher_sequences * args.seq_len, dtype_bytes),
        "fitness": fitness,
        "torch_threads": torch.get_num_threads(),
        "streamed": bool(extra),
        "offloaded": args.offload,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="override the number of decoder layers (0: the shape's)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--space", default="structured", choices=["structured", "unstructured", "nm", "mixed"])
    p.add_argument("--mlp-step", type=int, default=128)
    p.add_argument("--no-drop", action="store_true", help="no k=0 option (a shorter OBS sweep)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5])
    p.add_argument("--pruner", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    p.add_argument("--calib-sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--fisher-sequences", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--fitness-sequences", type=int, default=1)
    p.add_argument("--fitness-candidates", type=int, default=2, help="0: no fitness measurement")
    p.add_argument("--offload", action="store_true",
                   help="decoder layers on the meta device, one at a time materialised (no fitness measurement)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="JSON name under runs/bench/scale/ (default: shape-dtype-device)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1, default=str))
    name = args.out or f"{args.shape}-{args.dtype}-{result['device'].replace(':', '')}" + ("-offload" if args.offload else "")
    write_result("scale", name, result)
    return result


if __name__ == "__main__":
    main()
