"""The fitness that evo, bayes, tyr and random optimise: mean per-token KL(dense ‖ candidate) on calibration text.

Scoring many candidates is the whole cost of those searchers, so each one is made cheap:
- dense log-probabilities of the calibration pool are computed once (float16) instead of a dense forward per score;
- one working model is re-stitched in place by swapping unit modules that are built once per level and kept in
  memory (no model copies, no database reads per candidate);
- the inputs of every decoder layer are kept for a few recently scored candidates, and a candidate starts from
  the deepest layer whose prefix (all units before it) equals one of theirs;
- repeated (candidate, token count) pairs are answered from the Fitness memo and cost nothing.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask

from allocator.core.space import Space
from allocator.model.surgery import LevelSource, decoder_layers, unit_modules
from search.fitness import Fitness

LayerKey = tuple[int, ...]  # the option indices of one decoder layer's units


@torch.inference_mode()
def dense_log_probs(dense: nn.Module, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Log-probabilities of every position, kept in float16 (half the memory; KL agrees to a few 1e-3)."""
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        logits = dense(tokens[start : start + batch_size]).logits.float()
        out.append(F.log_softmax(logits, dim=-1).to(torch.float16))
    return torch.cat(out)


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
    ) -> None:
        super().__init__(seq_len=pool.shape[1], pool_sequences=pool.shape[0])
        self.dense, self.source = dense, source
        self.shape, self.units = space.shape, space.units
        self.pool = pool
        self.batch_size = batch_size
        self.prefix_references = prefix_references if prefix_reuse else 0
        self._layer_units: list[list[int]] = [[] for _ in range(self.shape.num_layers)]
        for u, unit in enumerate(self.units):
            self._layer_units[unit.layer].append(u)
        self._modules: dict[tuple[int, int], dict[str, nn.Module]] = {}
        # The working model: dense structure, shared tensors, units swapped per candidate.
        shared = {id(t): t for t in [*dense.parameters(), *dense.buffers()]}
        self.model = copy.deepcopy(dense, memo=shared)
        self._current = [u.options.index(u.full) for u in self.units]
        self._dense_logp = dense_log_probs(dense, pool, batch_size)
        # n_sequences → LRU of (layer keys, inputs of every layer + the final hidden state)
        self._refs: dict[int, OrderedDict[tuple[LayerKey, ...], list[torch.Tensor]]] = {}
        self.layers_computed = 0
        self.layers_reused = 0

    def _unit(self, u: int, j: int) -> dict[str, nn.Module]:
        key = (u, j)
        if key not in self._modules:
            unit = self.units[u]
            self._modules[key] = unit_modules(self.dense, self.shape, unit.layer, unit.kind, unit.options[j], self.source)
        return self._modules[key]

    def stitch(self, choice: Sequence[int]) -> nn.Module:
        """Put the candidate's unit modules into the working model (only the units that change) and return it."""
        layers = decoder_layers(self.model)
        for u, j in enumerate(choice):
            if self._current[u] != j:
                for name, module in self._unit(u, j).items():
                    setattr(layers[self.units[u].layer], name, module)
                self._current[u] = j
        return self.model

    def _layer_keys(self, choice: tuple[int, ...]) -> tuple[LayerKey, ...]:
        return tuple(tuple(choice[u] for u in units) for units in self._layer_units)

    def _score(self, choices: list[tuple[int, ...]], n_sequences: int) -> list[float]:
        # Sorted by layer keys, consecutive candidates share long prefixes; results go back in the asked order.
        order = sorted(range(len(choices)), key=lambda i: self._layer_keys(choices[i]))
        values: list[float] = [0.0] * len(choices)
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
