"""The fitness that evo, bayes, tyr and random optimise: mean per-token KL(dense ‖ candidate) on calibration text.

Scoring many candidates is the whole cost of those searchers, so each one is made cheap:
- dense log-probabilities of the calibration pool are computed once (float16) instead of a dense forward per score;
- one working model is re-stitched in place by swapping unit modules, built from the level store on first use and
  kept in a cache bounded by `cache_bytes`, least recently used out first (a module that falls out is built
  again from its level file when a candidate needs it: the same weights, so the same scores);
- the inputs of every decoder layer are kept for a few recently scored candidates, and a candidate starts from
  the deepest layer whose prefix (all units before it) equals one of theirs;
- repeated (candidate, token count) pairs are answered from the Fitness memo and cost nothing.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask

from allocator.core.space import Space
from allocator.model.placement import input_device
from allocator.model.surgery import LevelSource, decoder_layers, unit_modules
from search.fitness import Fitness

LayerKey = tuple[int, ...]  # the option indices of one decoder layer's units
UnitModules = dict[str, nn.Module]


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block on `threads` intra-op threads (0: as set), then restore the count. A CPU matmul's sums depend
    on how many threads split them (tiny-llama KLs differ by ~1e-9 between 1 and 2 threads), so every process that
    scores candidates of one search pins the same count, and a Ray worker's scores equal the serial ones bit for bit."""
    before = torch.get_num_threads()
    if threads > 0 and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@torch.inference_mode()
def dense_log_probs(dense: nn.Module, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Log-probabilities of every position, kept in float16 (half the memory; KL agrees to a few 1e-3)."""
    out = []
    tokens = tokens.to(input_device(dense))  # a dispatched model brings its outputs back to this device
    for start in range(0, tokens.shape[0], batch_size):
        logits = dense(tokens[start : start + batch_size]).logits.float()
        out.append(F.log_softmax(logits, dim=-1).to(torch.float16))
    return torch.cat(out)


def storages(module_tensors: Sequence[torch.Tensor]) -> dict[int, int]:
    """data pointer → bytes of every distinct storage behind the tensors."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in module_tensors}


class UnitCache:
    """Built unit modules by (unit, option index), least recently used out first once their own bytes (tensors not
    shared with the dense model) exceed `max_bytes`. A module evicted while the working model still holds it stays
    alive there until it is swapped out, so memory is bounded by max_bytes plus one candidate's units."""

    def __init__(self, build, dense_storages: set[int], max_bytes: float) -> None:
        self.build, self.dense_storages, self.max_bytes = build, dense_storages, max_bytes
        self.entries: OrderedDict[tuple[int, int], tuple[UnitModules, int]] = OrderedDict()
        self.bytes = 0
        self.builds = 0
        self.evictions = 0

    def own_bytes(self, modules: UnitModules) -> int:
        tensors = [t for m in modules.values() for t in [*m.parameters(), *m.buffers()]]
        return sum(n for ptr, n in storages(tensors).items() if ptr not in self.dense_storages)

    def get(self, key: tuple[int, int]) -> UnitModules:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key][0]
        modules = self.build(*key)
        self.builds += 1
        size = self.own_bytes(modules)
        self.entries[key] = (modules, size)
        self.bytes += size
        while self.bytes > self.max_bytes and self.entries:
            _, (_, dropped) = self.entries.popitem(last=False)
            self.bytes -= dropped
            self.evictions += 1
        return modules


class StitchedKLFitness(Fitness):
    def __init__(
        self,
        dense: nn.Module,
        space: Space,
        source: LevelSource,
        pool: torch.Tensor,
        batch_size: int = 4,
        prefix_references: int = 4,
        prefix_reuse: bool = True,
        cache_bytes: float = float("inf"),
        threads: int = 0,
        dense_logp: torch.Tensor | None = None,
    ) -> None:
        """`cache_bytes` bounds the built unit modules kept (FitnessConfig.cache_gb); `threads` is the intra-op
        thread count every forward pass of this engine runs on (0: torch's count now); `dense_logp`, the pool's
        dense log-probabilities when a caller already has them (a Ray worker gets the driver's)."""
        super().__init__(seq_len=pool.shape[1], pool_sequences=pool.shape[0])
        self.dense, self.source = dense, source
        self.shape, self.units = space.shape, space.units
        # Everything a score touches lives where the dense model is (allocator/model/placement.py): the pool, its
        # dense log-probabilities and, built from levels onto that device, the unit modules. On the CPU: no copy.
        self.device = input_device(dense)
        self.pool = pool.to(self.device)
        self.batch_size = batch_size
        self.prefix_references = prefix_references if prefix_reuse else 0
        self._layer_units: list[list[int]] = [[] for _ in range(self.shape.num_layers)]
        for u, unit in enumerate(self.units):
            self._layer_units[unit.layer].append(u)
        dense_tensors = [*dense.parameters(), *dense.buffers()]
        self.cache = UnitCache(self._build_unit, set(storages(dense_tensors)), cache_bytes)
        # The working model: dense structure, shared tensors, units swapped per candidate.
        shared = {id(t): t for t in dense_tensors}
        self.model = copy.deepcopy(dense, memo=shared)
        self._current = [u.options.index(u.full) for u in self.units]
        self.threads = threads if threads > 0 else torch.get_num_threads()
        if dense_logp is None:
            with torch_threads(self.threads):
                dense_logp = dense_log_probs(dense, self.pool, batch_size)
        self._dense_logp = dense_logp.to(self.device)
        # n_sequences → LRU of (layer keys, inputs of every layer + the final hidden state)
        self._refs: dict[int, OrderedDict[tuple[LayerKey, ...], list[torch.Tensor]]] = {}
        self.layers_computed = 0
        self.layers_reused = 0

    def _build_unit(self, u: int, j: int) -> UnitModules:
        unit = self.units[u]
        return unit_modules(self.dense, self.shape, unit.layer, unit.kind, unit.options[j], self.source)

    def stitch(self, choice: Sequence[int]) -> nn.Module:
        """Put the candidate's unit modules into the working model (only the units that change) and return it."""
        layers = decoder_layers(self.model)
        for u, j in enumerate(choice):
            if self._current[u] != j:
                for name, module in self.cache.get((u, j)).items():
                    setattr(layers[self.units[u].layer], name, module)
                self._current[u] = j
        return self.model

    def _layer_keys(self, choice: tuple[int, ...]) -> tuple[LayerKey, ...]:
        return tuple(tuple(choice[u] for u in units) for units in self._layer_units)

    def _score(self, choices: list[tuple[int, ...]], n_sequences: int) -> list[float]:
        # Sorted by layer keys, consecutive candidates share long prefixes; results go back in the asked order.
        order = sorted(range(len(choices)), key=lambda i: self._layer_keys(choices[i]))
        values: list[float] = [0.0] * len(choices)
        with torch_threads(self.threads):
            for i in order:
                values[i] = self._kl(choices[i], n_sequences)
        return values

    def _best_reference(self, keys: tuple[LayerKey, ...], n_sequences: int) -> tuple[int, list[torch.Tensor] | None]:
        """(number of leading layers shared, that reference's saved states) for the longest shared prefix."""
        best, best_keys = 0, None
        refs = self._refs.get(n_sequences, OrderedDict())
        for ref_keys in refs:
            shared = 0
            while shared < len(keys) and keys[shared] == ref_keys[shared]:
                shared += 1
            if shared > best:
                best, best_keys = shared, ref_keys
        if best_keys is None:
            return 0, None
        refs.move_to_end(best_keys)  # a reference that keeps being reused (the parent) stays
        return best, refs[best_keys]

    @torch.inference_mode()
    def _kl(self, choice: tuple[int, ...], n_sequences: int) -> float:
        model = self.stitch(choice)
        tokens = self.pool[:n_sequences]
        keys = self._layer_keys(choice)
        shared, saved = self._best_reference(keys, n_sequences) if self.prefix_references else (0, None)
        inner = model.model
        layers = decoder_layers(model)
        n_layers = len(layers)
        # Inputs of each layer, then the last layer's output: states[l] feeds layer l.
        states: list[torch.Tensor] = list(saved[: shared + 1]) if saved is not None else []
        if not states:
            states = [inner.embed_tokens(tokens)]
        start = len(states) - 1
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        mask = create_causal_mask(
            config=model.config, inputs_embeds=states[0], attention_mask=None, past_key_values=None, position_ids=positions
        )
        rotary = inner.rotary_emb(states[0], position_ids=positions)
        hidden = states[-1]
        for layer in layers[start:]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
            states.append(hidden)
        self.layers_computed += n_layers - start
        self.layers_reused += start
        if self.prefix_references:
            refs = self._refs.setdefault(n_sequences, OrderedDict())
            refs[keys] = states
            refs.move_to_end(keys)
            while len(refs) > self.prefix_references:
                refs.popitem(last=False)
        final = inner.norm(hidden)
        total = 0.0
        for start_seq in range(0, n_sequences, self.batch_size):
            chunk = slice(start_seq, min(start_seq + self.batch_size, n_sequences))
            logq = F.log_softmax(model.lm_head(final[chunk]).float(), dim=-1)
            logp = self._dense_logp[chunk].float()
            total += F.kl_div(logq, logp, log_target=True, reduction="sum").item()
        return total / (n_sequences * self.seq_len)
