"""The search space: per decoder layer an attention unit and an MLP unit, each with its options.

An option is either an int, the structured width kept (KV groups or neurons; the full width is the dense unit),
or a str, a sparsity pattern label ("unstructured70", "2:4", "block16x16-50") applied to every linear of the
unit at full width. `space.kind` picks which options a unit has, `space.runtime` which of them its engine runs at
full benefit, and at what shape (EngineRules, run_shape)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Union

from allocator.core.config import (
    PrunerName,
    Runtime,
    SpaceConfig,
    SpaceKind,
    check_choice,
)
from allocator.core.errors import UserInputError
from allocator.core.patterns import SparsityPattern, kept_count

ATTN = "attn"
MLP = "mlp"
Option = Union[int, str]


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class Unit:
    """One prunable place. Options are kept counts (KV groups or neurons), ascending; `full` is the dense one."""

    name: str
    layer: int
    kind: str
    full: int
    options: tuple[Option, ...]


def is_sparse(option: Option) -> bool:
    return isinstance(option, str)


def sparse_pattern(option: Option) -> SparsityPattern:
    return SparsityPattern.parse(option)


def kept_width(shape: ModelShape, kind: str, option: Option) -> int:
    """Structured width an option keeps: a sparse option keeps every KV group / neuron."""
    return full_width(shape, kind) if is_sparse(option) else option


def full_width(shape: ModelShape, kind: str) -> int:
    return shape.num_kv_heads if kind == ATTN else shape.intermediate


@dataclass(frozen=True)
class EngineRules:
    """How the engine of `space.runtime` runs a unit's options: the rules `run_shape` applies (README, "Engines")."""

    runtime: Runtime = Runtime.native
    # llama.cpp only: neurons of the all-zero MLP a dropped MLP is exported as, because llama.cpp's `deci` graph
    # skips the whole layer, its attention output included, where feed_forward_length is 0 (LLAMACPP_ZERO_MLP, the
    # gguf export's width); 0 for the other engines, which drop an MLP exactly.
    zero_mlp: int = 0


NATIVE = EngineRules()
# The gguf export writes a dropped MLP beside a kept attention as a zero MLP this wide: its output is exactly 0 and
# llama.cpp keeps the layer (one norm and three 1-wide products a token).
LLAMACPP_ZERO_MLP = 1


def run_shape(shape: ModelShape, kind: str, option: Option, rules: EngineRules = NATIVE) -> ModelShape:
    """The model shape whose `kind` unit is the dense unit `rules.runtime` runs for `option`, zero-padded parts
    included: attention as query heads (num_heads) and KV heads (num_kv_heads), an MLP as neurons (intermediate);
    0 where nothing runs. A sparse option runs at the full shape (its format is priced apart).
    vLLM keeps every layer's query heads at num_attention_heads (n_heads_in_group = heads / KV heads), so k KV
    groups run all query heads, the pruned ones zero; llama.cpp takes per-layer head counts, so they are exact."""
    if kind == ATTN:
        kv = kept_width(shape, ATTN, option)
        queries = shape.num_heads if rules.runtime == Runtime.vllm else kv * shape.heads_per_group
        return replace(shape, num_heads=queries if kv else 0, num_kv_heads=kv)
    return replace(shape, intermediate=kept_width(shape, MLP, option) or rules.zero_mlp)


def runs(run: ModelShape, kind: str) -> bool:
    """Whether a unit of run shape `run` (from run_shape) runs at all."""
    return bool(run.num_kv_heads if kind == ATTN else run.intermediate)


def option_key(option: Option) -> str:
    """The option as a JSON key / file stem; `parse_option_key` inverts it."""
    return str(option)


def parse_option_key(key: str) -> Option:
    return int(key) if key.isdigit() else key


def unit_linear_shapes(shape: ModelShape, kind: str) -> list[tuple[int, int]]:
    """(out, in) of a full-width unit's linears: q, k, v, o or gate, up, down."""
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    if kind == ATTN:
        return [(q, shape.hidden), (kv, shape.hidden), (kv, shape.hidden), (shape.hidden, q)]
    return [(shape.intermediate, shape.hidden), (shape.intermediate, shape.hidden), (shape.hidden, shape.intermediate)]


def option_params(shape: ModelShape, kind: str, kept: Option) -> int:
    """Linear weights (non-zeros) a unit keeps: q, k, v, o for `kept` KV groups, or gate, up, down for `kept`
    neurons; a sparse option keeps exactly its pattern's count in each full-width linear."""
    if is_sparse(kept):
        pattern = sparse_pattern(kept)
        return sum(kept_count(pattern, rows, cols) for rows, cols in unit_linear_shapes(shape, kind))
    if kind == ATTN:
        q_and_o = 2 * shape.hidden * kept * shape.heads_per_group * shape.head_dim
        return q_and_o + 2 * shape.hidden * kept * shape.head_dim
    return 3 * shape.hidden * kept


def unit_name(layer: int, kind: str) -> str:
    return f"layer{layer:02d}.{kind}"


def mlp_levels(intermediate: int, cfg: SpaceConfig) -> tuple[int, ...]:
    if cfg.width_multiple < 1 or cfg.mlp_step % cfg.width_multiple:
        raise UserInputError(
            f"space.mlp_step={cfg.mlp_step} must be a positive multiple of space.width_multiple={cfg.width_multiple}"
        )
    if not 0 < cfg.mlp_step <= intermediate:
        raise UserInputError(f"space.mlp_step={cfg.mlp_step} must be in 1..{intermediate} (the MLP width)")
    levels = set(range(cfg.mlp_step, intermediate, cfg.mlp_step)) | {intermediate}
    if cfg.allow_drop:
        levels.add(0)
    return tuple(sorted(levels))


def attention_levels(shape: ModelShape, cfg: SpaceConfig) -> tuple[int, ...]:
    """KV groups kept: every count (0 when dropping is allowed), or under vLLM only those dividing the query heads
    (its n_heads_in_group = heads / KV heads must be an integer), so no plan needs its KV heads padded."""
    widths = range(0 if cfg.allow_drop else 1, shape.num_kv_heads + 1)
    if cfg.runtime == Runtime.vllm:
        return tuple(k for k in widths if k == 0 or shape.num_heads % k == 0)
    return tuple(widths)


def _fraction_patterns(kind: str, fractions: list[float], field: str, **extra) -> list[SparsityPattern]:
    patterns = []
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise UserInputError(f"space.{field} has {f}; each fraction of weights removed must be in (0, 1)")
        patterns.append(SparsityPattern(kind, float(f), **extra))
    return patterns


def sparse_patterns(cfg: SpaceConfig) -> list[SparsityPattern]:
    """The sparse patterns of `space.kind` (none for "structured"), validated."""
    check_choice("space.kind", cfg.kind, SpaceKind)
    check_choice("space.pruner", cfg.pruner, PrunerName)
    check_choice("space.runtime", cfg.runtime, Runtime)
    if cfg.runtime != Runtime.native and cfg.kind != SpaceKind.structured:
        raise UserInputError(
            f"space.kind={cfg.kind} with space.runtime={cfg.runtime}: {cfg.runtime} runs no sparse weights (they would "
            f"run dense, at no speedup); valid: space.kind=structured, or space.runtime=native for sparse options"
        )
    patterns: list[SparsityPattern] = []
    if cfg.kind in ("unstructured", "mixed"):
        patterns += _fraction_patterns("unstructured", cfg.sparsities, "sparsities")
    if cfg.kind in ("nm", "mixed"):
        for label in cfg.nm_patterns:
            try:
                pattern = SparsityPattern.parse(label)
            except ValueError as exc:
                raise UserInputError(f"space.nm_patterns has {label!r}: {exc}") from None
            if pattern.kind != "nm" or pattern.n == pattern.m:
                raise UserInputError(f"space.nm_patterns has {label!r}; expected '<n>:<m>' with n < m, e.g. 2:4")
            patterns.append(pattern)
    if cfg.kind == "mixed":
        if len(cfg.block) != 2 or min(cfg.block) < 1:
            raise UserInputError(f"space.block={list(cfg.block)} must be two positive ints [rows, cols]")
        patterns += _fraction_patterns("block", cfg.block_sparsities, "block_sparsities", block=tuple(cfg.block))
    if cfg.kind != "structured" and not patterns:
        raise UserInputError(f"space.kind={cfg.kind} has no sparse options: its option lists are empty")
    return patterns


def check_pattern_fits(shape: ModelShape, pattern: SparsityPattern) -> None:
    """Every linear of both unit kinds must carry the pattern exactly (N:M groups, whole blocks)."""
    for rows, cols in dict.fromkeys(s for kind in (ATTN, MLP) for s in unit_linear_shapes(shape, kind)):
        try:
            pattern.check_shape((rows, cols))
        except ValueError as exc:
            raise UserInputError(f"space option {pattern.label} does not fit this model: {exc}") from None


@dataclass(frozen=True)
class Space:
    """A model's search space: its shape and its units (attention, then MLP, per layer in order). Every unit of a
    kind has that kind's options, so `options[kind]` describes all of them."""

    shape: ModelShape
    units: tuple[Unit, ...]
    # The kernel format unstructured sparse options are exported, run and priced in (resolved from
    # space.unstructured_format by allocator.core.formats.resolve_unstructured_format; never "auto").
    unstructured_format: str = "bitmap"
    rules: EngineRules = NATIVE  # the engine the options are priced for (space.runtime)
    # kind → its options, ascending in kept weights (the dense one last): the form latency tables are keyed on.
    options: dict[str, list[Option]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.unstructured_format not in ("bitmap", "csr8"):
            raise ValueError(f"Space.unstructured_format={self.unstructured_format!r}: a resolved one, bitmap or csr8")
        object.__setattr__(self, "units", tuple(self.units))
        options: dict[str, tuple[Option, ...]] = {}
        for unit in self.units:
            if options.setdefault(unit.kind, unit.options) != unit.options:
                raise ValueError(f"unit {unit.name} has options {unit.options}, other {unit.kind} units {options[unit.kind]}")
        object.__setattr__(self, "options", {kind: list(opts) for kind, opts in options.items()})

    @property
    def has_sparse(self) -> bool:
        return any(is_sparse(o) for opts in self.options.values() for o in opts)

    def format_settings(self) -> dict[str, str]:
        """Part of a latency table's settings (its cache key): the unstructured format, only when it is not bitmap,
        so tables of bitmap spaces keep the keys they had before the format was a choice."""
        return {} if self.unstructured_format == "bitmap" else {"unstructured_format": self.unstructured_format}

    @property
    def runtime(self) -> Runtime:
        return self.rules.runtime

    def dense_allocation(self) -> dict[str, Option]:
        return {u.name: u.full for u in self.units}


def build_space(shape: ModelShape, cfg: SpaceConfig, unstructured_format: str = "bitmap") -> Space:
    """Options ascending in kept weights (ties in label order), the dense one last; unstructured options in
    `unstructured_format` (resolved from cfg.unstructured_format by the caller, which knows the budget's regime)."""
    patterns = sparse_patterns(cfg)
    for pattern in patterns:
        check_pattern_fits(shape, pattern)
    labels = sorted({p.label for p in patterns})
    if cfg.kind == "structured" or cfg.kind == "mixed":
        attn_widths = attention_levels(shape, cfg)
        mlp_widths = mlp_levels(shape.intermediate, cfg)
    else:  # sparse spaces keep every unit at full width (or drop it, when allowed)
        attn_widths = (0, shape.num_kv_heads) if cfg.allow_drop else (shape.num_kv_heads,)
        mlp_widths = (0, shape.intermediate) if cfg.allow_drop else (shape.intermediate,)

    def ordered(widths: tuple[int, ...], kind: str) -> tuple[Option, ...]:
        options: list[Option] = [*widths[:-1], *labels]
        options.sort(key=lambda o: (option_params(shape, kind, o), is_sparse(o), str(o)))
        return (*options, widths[-1])

    attn_options, mlp_options = ordered(attn_widths, ATTN), ordered(mlp_widths, MLP)
    units = []
    for layer in range(shape.num_layers):
        units.append(Unit(unit_name(layer, ATTN), layer, ATTN, shape.num_kv_heads, attn_options))
        units.append(Unit(unit_name(layer, MLP), layer, MLP, shape.intermediate, mlp_options))
    if not any(p.kind == "unstructured" for p in patterns):  # nothing stored in it: keys and plans stay bitmap's
        unstructured_format = "bitmap"
    zero_mlp = LLAMACPP_ZERO_MLP if cfg.runtime == Runtime.llamacpp else 0
    return Space(shape, tuple(units), unstructured_format, EngineRules(Runtime(cfg.runtime), zero_mlp))

