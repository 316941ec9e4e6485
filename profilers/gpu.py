"""GPU profiler: what each (unit, option) costs inside the real model on a CUDA device, timed as CUDA graphs.

Same variants and table format as profilers/cpu.py. Each variant's forward step (one regime) is captured once as a
CUDA graph over several copies of the weights it reads, so a replay reads every weight from memory rather than L2
(a deployed model is far larger than L2; a small model timed alone would not be), and replayed interleaved with
the other variants. Everything but the CUDA calls (the `CudaTimer`) also runs on CPU with `device="cpu"`, so the
whole pipeline is tested on machines without a GPU. The timers and the device/driver probes are in
profilers/gpu_timing.py."""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from allocator.core.config import ProfileConfig
from allocator.core.errors import UserInputError
from allocator.core.memory import kv_bytes, unit_weight_bytes
from allocator.core.space import ATTN, ModelShape, Space, is_sparse
from allocator.model.loader import DTYPES
from allocator.model.sparse_export import build_deployable
from allocator.model.surgery import DroppedAttention, decoder_layers, leading_levels
from kernels.sparse_linear import SparseLinear
from profilers.gpu_timing import Sampler, Timer, current_fingerprint, make_timer, rotation_count
from profilers.regimes import Regime
from profilers.roofline import deploy_dtype
from profilers.table import CostTable, RegimeCosts, base_cost, clean_curve, load_or_measure, runtime_settings
from profilers.timing import TimingStats, interleaved_schedule, round_stats

log = logging.getLogger(__name__)
# How costs are derived from the timings; part of the table's cache key, so a change re-measures.
METHOD = ("cuda-graph steps over L2-rotated weight copies, neighbour-dense variants, measured fixed, "
          "per-variant medians, per-layer cost = (variant - cheapest variant) / layers")


# ---- pure helpers (tested on CPU) ----

def gpu_regimes(cfg: ProfileConfig) -> list[Regime]:
    """Prefill and decode at decode_batches ∪ gpu_decode_batches: a superset of regimes_of(cfg), so the registry
    finds every regime a search may ask for."""
    batches = sorted(set(cfg.decode_batches) | set(cfg.gpu_decode_batches))
    out = [Regime("prefill", "prefill", cfg.prefill_batch, cfg.prefill_length)]
    return out + [Regime(f"decode_b{b}", "decode", b, cfg.decode_context) for b in batches]


def find_gpu_regime(cfg: ProfileConfig, name: str) -> Regime:
    by_name = {r.name: r for r in gpu_regimes(cfg)}
    if name not in by_name:
        raise UserInputError(f"regime {name!r} is not profiled on GPU; known: {', '.join(by_name)} "
                             "(see profile.decode_batches, profile.gpu_decode_batches)")
    return by_name[name]


def memory_groups(sizes: dict[str, int], budget: int | None) -> list[list[str]]:
    """Consecutive variants whose device bytes fit `budget` together (None: all in one group). A large model's
    variants cannot all be resident at once: each pruned one holds its own shrunk weights and KV cache."""
    if budget is None:
        return [list(sizes)] if sizes else []
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes.items():
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        groups.append(current)
    return groups


def variant_name(kind: str, kept: int, full: int) -> str:
    return "dense" if kept == full else f"{kind}={kept}"


def gpu_variants(space: Space) -> dict[str, dict[str, int]]:
    """dense; fixed (every unit at its cheapest option); and each option of a kind in every layer with the other
    kind dense, so an option is timed beside the neighbouring block it will run with."""
    dense = space.dense_allocation()
    variants = {"dense": dense, "fixed": {u.name: u.options[0] for u in space.units}}
    for kind, options in space.options.items():
        for kept in options[:-1]:
            variants[variant_name(kind, kept, options[-1])] = {
                u.name: kept if u.kind == kind else u.full for u in space.units
            }
    return variants


def variant_bytes(
    space: Space, allocation: dict[str, int], regime: Regime, element_bytes: int
) -> tuple[int, int]:
    """(bytes one step reads: kept weights, norms, lm_head, KV cache; bytes the variant owns beyond the dense model:
    its shrunk weights and its KV cache). The untied input embedding is left out: a step gathers a few rows."""
    context = regime.length + 1 if regime.kind == "decode" else regime.length
    shape = space.shape
    read = own = 0
    for u in space.units:
        kept = allocation[u.name]
        weights = unit_weight_bytes(shape, u.kind, kept, element_bytes, space.rules, space.unstructured_format)
        read += weights
        own += weights if kept not in (0, u.full) else 0
        if u.kind == ATTN:
            kv = kv_bytes(shape, kept, regime.batch, context, element_bytes, space.rules)
            read, own = read + kv, own + kv
    read += (shape.vocab + 1) * shape.hidden * element_bytes  # lm_head and the final norm
    return read, own


def variant_groups(
    space: Space, allocations: dict[str, dict[str, int]], regime: Regime, timer: Timer, l2_rotations: int,
    element_bytes: int,
) -> list[list[str]]:
    """Groups of the variants (all but "dense", which stays resident) that fit the timer's memory budget together:
    each variant's own weights and KV cache plus its L2-rotation copies."""
    sizes = {}
    for name, alloc in allocations.items():
        read, own = variant_bytes(space, alloc, regime, element_bytes)
        sizes[name] = own + (rotation_count(timer.l2_bytes, read, l2_rotations) - 1) * read
    budget = timer.memory_budget()
    return memory_groups({n: s for n, s in sizes.items() if n != "dense"},
                         None if budget is None else max(0, budget - sizes["dense"]))


def regime_costs(
    regime: Regime, num_layers: int, options: dict[str, list[int]], stats: dict[str, TimingStats], raw: dict
) -> RegimeCosts:
    """A kind's per-layer cost at option k = (T(k everywhere, other kind dense) - T(its cheapest option everywhere,
    other kind dense)) / layers, clipped at 0, widths cleaned non-decreasing in k (noise can order two close widths
    wrongly; rounding up keeps predictions pessimistic). The cheapest option is the narrowest width, or a sparse
    format faster than it. fixed = the measured model with every unit at its first option when that is the
    cheapest (structured spaces), else dense less what each kind's cheapest option saves."""
    unit_ms = {}
    saved = 0.0
    first_is_cheapest = True
    for kind, opts in options.items():
        full = opts[-1]
        times = {k: stats[variant_name(kind, k, full)].median_ms for k in opts}
        base = base_cost(times)
        first_is_cheapest &= not is_sparse(opts[0]) and times[opts[0]] == base
        saved += times[full] - base
        unit_ms[kind] = clean_curve({k: max(0.0, (t - base) / num_layers) for k, t in times.items()})
    dense_ms = stats["dense"].median_ms
    fixed_ms = stats["fixed"].median_ms if first_is_cheapest else dense_ms - saved
    return RegimeCosts(asdict(regime), fixed_ms, dense_ms, unit_ms, raw)


# ---- models and steps ----

class FixedContextLayer(DynamicLayer):
    """A KV-cache layer of fixed context: new tokens are written in place after `context` positions and the
    context never grows, so one captured decode step replays identically (a static cache, as servers keep)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, context: int) -> None:
        super().__init__()
        self.keys, self.values, self.context = keys, values, context
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.context + key_states.shape[-2]
        self.keys[:, :, self.context:end].copy_(key_states)
        self.values[:, :, self.context:end].copy_(value_states)
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.context

    def get_max_length(self) -> int:
        return self.keys.shape[-2]


def fixed_context_cache(model: nn.Module, batch: int, context: int, generator: torch.Generator) -> DynamicCache:
    """Random keys/values for `context` positions plus one slot for the new token, each layer with its own
    (pruned) KV head count; a dropped attention gets DroppedAttention's one-scalar marker."""
    head_dim = ModelShape.from_config(model.config).head_dim
    param = next(model.parameters())
    cache = DynamicCache()
    layers = []
    for layer in decoder_layers(model):
        attn = layer.self_attn
        heads, dim = (1, 1) if isinstance(attn, DroppedAttention) else (attn.k_proj.out_features // head_dim, head_dim)
        size = (batch, heads, context + 1, dim)
        keys, values = (torch.randn(size, generator=generator, device=param.device, dtype=param.dtype) for _ in "kv")
        layers.append(FixedContextLayer(keys, values, context))
    cache.layers = layers
    return cache


def _kv_width(layer: nn.Module) -> int:
    """K (or V) elements per token a decoder layer caches: KV heads x head dim, or DroppedAttention's marker."""
    attn = layer.self_attn
    return 1 if isinstance(attn, DroppedAttention) else attn.k_proj.out_features


@dataclass
class Step:
    run: Callable[[], object]
    kv_bytes: int  # the KV cache this step reads (decode) or writes (prefill)


def forward_step(model: nn.Module, regime: Regime, seed: int = 0) -> Step:
    """One step of `regime` with inputs on the model's device: a prefill of batch x length tokens, or one new
    token per sequence over a fixed context of `length` (last-token logits only, as generation keeps)."""
    param = next(model.parameters())
    generator = torch.Generator(device=param.device).manual_seed(seed)
    vocab = model.config.vocab_size
    if regime.kind == "prefill":
        ids = torch.randint(0, vocab, (regime.batch, regime.length), generator=generator, device=param.device)
        kv = 2 * ids.numel() * sum(map(_kv_width, decoder_layers(model))) * param.element_size()

        def prefill() -> object:
            with torch.inference_mode():
                return model(ids, use_cache=True, logits_to_keep=1)

        return Step(prefill, kv)
    if regime.kind != "decode":
        raise ValueError(f"unknown regime kind {regime.kind!r}; valid: prefill, decode")
    ids = torch.randint(0, vocab, (regime.batch, 1), generator=generator, device=param.device)
    positions = torch.full((regime.batch, 1), regime.length, device=param.device)
    cache = fixed_context_cache(model, regime.batch, regime.length, generator)

    def decode() -> object:
        with torch.inference_mode():
            return model(ids, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1)

    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return Step(decode, kv)


def device_copy(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`model` on `device` with its parameters in `dtype`, leaving the original untouched (the search goes on
    using it). SparseLinear's value buffers (compressed values, bias) are cast to `dtype` too, its metadata buffers
    not; other buffers (rotary frequencies) keep their dtype. Tied weights stay tied."""
    memo: dict[int, object] = {}
    values = {id(getattr(m, name)) for m in model.modules() if isinstance(m, SparseLinear)
              for name in m.value_buffer_names()}
    with torch.no_grad():
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(p.detach().to(device, dtype), requires_grad=False)
        for b in model.buffers():
            memo[id(b)] = b.to(device, dtype) if id(b) in values else b.to(device)
    return copy.deepcopy(model, memo)


def _untied_embedding(model: nn.Module) -> torch.Tensor | None:
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    return None if output is not None and output.weight is embedding else embedding


def weight_read_bytes(model: nn.Module) -> int:
    """Weight bytes one step reads: the parameters but an untied input embedding (a step gathers a few of its rows)
    and the compressed weights and biases SparseLinear modules hold as buffers."""
    skip = _untied_embedding(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p is not skip)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    biases = sum(m.bias.numel() * m.bias.element_size() for m in sparse if m.bias is not None)
    return params + sum(m.weight_nbytes for m in sparse) + biases


def weight_copies(model: nn.Module, n: int) -> list[nn.Module]:
    """`model` and n-1 copies with their own weights, compressed ones included (other buffers and an untied input
    embedding shared)."""
    compressed = {id(b) for m in model.modules() if isinstance(m, SparseLinear) for b in m.buffers()}
    shared = [b for b in model.buffers() if id(b) not in compressed]
    embedding = _untied_embedding(model)
    if embedding is not None:
        shared.append(embedding)
    with torch.no_grad():
        return [model] + [copy.deepcopy(model, {id(t): t for t in shared}) for _ in range(n - 1)]


def time_models(
    build: dict[str, Callable[[], nn.Module]],
    regime: Regime,
    timer: Timer,
    warmup: int,
    repeats: int,
    l2_rotations: int = 0,
    groups: list[list[str]] | None = None,
    seed: int = 0,
    desc: str = "timing",
) -> tuple[dict[str, TimingStats], dict]:
    """Time one `regime` step of each built model, interleaved per round. The first model is the anchor: it is
    kept and timed in every group (its samples pooled); each group's other models are built, timed, and freed.
    Returns the stats and a log: {"rotations": {name: copies}, "rounds": [device state per round]}."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    anchor, *others = build
    groups = [others] if groups is None else groups
    samples: dict[str, list[float]] = {name: [] for name in build}
    rotations: dict[str, int] = {}
    rounds: list[dict] = []

    def prepare(name: str) -> Sampler:
        model = build[name]()
        first = forward_step(model, regime, seed)
        read = weight_read_bytes(model) + first.kv_bytes
        n = rotation_count(timer.l2_bytes, read, l2_rotations)
        if timer.l2_bytes and n * read <= 2 * timer.l2_bytes:
            log.warning("%s: %d weight copies (%.1f MB) do not exceed 2x L2 (%.1f MB); replays partly hit L2",
                        name, n, n * read / 1e6, 2 * timer.l2_bytes / 1e6)
        rotations[name] = n
        steps = [first] + [forward_step(m, regime, seed) for m in weight_copies(model, n)[1:]]
        return timer.prepare([s.run for s in steps])

    anchor_sampler = prepare(anchor)
    total = (warmup + repeats) * sum(len(g) + 1 for g in groups)
    with tqdm(total=total, desc=desc, unit="step", leave=False) as bar:
        for index, group in enumerate(groups):
            samplers = {anchor: anchor_sampler, **{name: prepare(name) for name in group}}
            per_round = {name: [] for name in samplers}
            for r, order in enumerate(interleaved_schedule(list(samplers), warmup + repeats, seed * 1000 + index)):
                if r >= warmup:
                    rounds.append({"group": index, **timer.state()})
                for name in order:
                    per_round[name].append(samplers[name]())
                    bar.update()
            for name, s in per_round.items():
                samples[name] += s[warmup:]
            del samplers
            timer.release()
    return round_stats(samples, 0), {"rotations": rotations, "rounds": rounds}


# ---- the profiler ----

def measure_regime(
    dense: nn.Module, space: Space, regime: Regime, cfg: ProfileConfig, timer: Timer
) -> RegimeCosts:
    """`dense` is already on the timer's device in the timed dtype."""
    source = leading_levels(dense, space.shape)
    variants = gpu_variants(space)
    groups = variant_groups(space, variants, regime, timer, cfg.l2_rotations,
                            next(dense.parameters()).element_size())
    build = {name: (lambda a=alloc: build_deployable(dense, space.shape, a, source, space.rules,
                                                     space.unstructured_format))
             for name, alloc in variants.items()}
    build["dense"] = lambda: dense
    stats, info = time_models(build, regime, timer, cfg.warmup, cfg.repeats, cfg.l2_rotations, groups,
                              desc=f"profile {regime.name} on {timer.device}")
    raw: dict = {name: {**asdict(s), "rotations": info["rotations"][name]} for name, s in stats.items()}
    raw["_rounds"] = info["rounds"]  # clock and temperature per timed round, to tell throttling from noise
    return regime_costs(regime, space.shape.num_layers, space.options, stats, raw)


def profile_gpu(
    dense: nn.Module,
    space: Space,
    cfg: ProfileConfig,
    dtype: str,
    cache_dir: str | Path,
    first_regime: str | None = None,
    on_regime: Callable[[str, RegimeCosts], None] | None = None,
    *,
    device: str | torch.device = "cuda",
) -> tuple[CostTable, Path]:
    """Load the table for this GPU/software/model/options, or measure it (`first_regime` first, so `on_regime` can
    check a budget before the other regimes are spent on). Timed in the deployment dtype (16-bit) on `device`;
    device="cpu" runs the same pipeline without graphs, for tests."""
    timer = make_timer(device)
    timed_dtype = deploy_dtype(dtype)
    fingerprint = current_fingerprint(timer.device, timed_dtype)
    regimes = gpu_regimes(cfg)
    settings = {
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "l2_rotations": cfg.l2_rotations,
        "timer": type(timer).__name__,
        "regimes": [asdict(r) for r in regimes],
        "method": METHOD,
        **space.format_settings(),  # only when not bitmap: bitmap tables keep their keys
        **runtime_settings(space),
    }
    by_name = {r.name: r for r in regimes}
    on_device: list[nn.Module] = []  # the timed copy, made only if some regime has to be measured

    def measure(name: str) -> RegimeCosts:
        regime = by_name[name]
        if not on_device:
            on_device.append(device_copy(dense, timer.device, DTYPES[timed_dtype]))
        log.info("measuring regime %s (batch %d, length %d) on %s", regime.name, regime.batch, regime.length,
                 fingerprint["device"])
        return measure_regime(on_device[0], space, regime, cfg, timer)

    try:
        return load_or_measure(
            cfg.name, cache_dir, fingerprint, asdict(space.shape), space.options, settings, list(by_name), measure,
            cfg.refresh, first_regime, on_regime,
        )
    finally:
        on_device.clear()
        timer.release()
