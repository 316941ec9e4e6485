"""What fitness-driven searchers call to score candidates, and how what they spend is counted and bounded.

A fitness scores allocations (lower is better) on whole calibration sequences: asking for more tokens gives a less
noisy score at a higher price, which is what staged selection trades. Every evaluation is charged in forward tokens
(sequences x sequence length per candidate, prefix reuse or not), so searchers compare at equal token budgets."""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any, Sequence

import numpy as np

from search.base import AllocationProblem


class Fitness:
    """Base: token accounting, limits and the incumbent trace; subclasses implement `_score`."""

    def __init__(self, seq_len: int, pool_sequences: int) -> None:
        if seq_len < 1 or pool_sequences < 1:
            raise ValueError(f"fitness: seq_len={seq_len} and pool_sequences={pool_sequences} must be >= 1")
        self.seq_len = seq_len
        self.pool_sequences = pool_sequences
        self.begin()

    @property
    def pool_tokens(self) -> int:
        return self.seq_len * self.pool_sequences

    def begin(self, max_tokens: int = 0, max_seconds: float = 0.0) -> None:
        """Reset the counters and the clock and set the bounds (0 = unbounded). Searchers call this first."""
        self.max_tokens = max_tokens
        self.max_seconds = max_seconds
        self.tokens_spent = 0
        self.evaluations = 0
        self.started = time.perf_counter()
        self.trace: list[dict[str, Any]] = []
        self._memo: dict[tuple[tuple[int, ...], int], float] = {}
        self._ahead: dict[tuple[tuple[int, ...], int], float] = {}

    @property
    def parallelism(self) -> int:
        """How many candidates this fitness scores at once (Ray workers); searchers that score one candidate at a
        time prefetch this many, so workers have work without changing what is found."""
        return 1

    def close(self) -> None:
        """Release what the fitness holds outside this process (Ray workers); nothing for a local fitness."""

    def sequences_for(self, tokens: int) -> int:
        """Whole sequences covering `tokens`, at least one and at most the pool."""
        if tokens < 1:
            raise ValueError(f"fitness: tokens per evaluation must be >= 1, got {tokens}")
        return min(self.pool_sequences, math.ceil(tokens / self.seq_len))

    def score(self, choices: Sequence[Sequence[int]], tokens: int) -> list[float]:
        """Fitness of each choice on the first ceil(tokens / seq_len) pool sequences (the same for all). Scores are
        deterministic per (choice, sequences), so a repeat is answered from a memo and costs no tokens."""
        n_seq = self.sequences_for(tokens)
        keys = [tuple(int(j) for j in c) for c in choices]
        fresh = list(dict.fromkeys(k for k in keys if (k, n_seq) not in self._memo))
        if fresh:
            todo = [k for k in fresh if (k, n_seq) not in self._ahead]
            self._ahead.update({(k, n_seq): v for k, v in zip(todo, self._score(todo, n_seq) if todo else [])})
            for key in fresh:
                self._memo[(key, n_seq)] = self._ahead.pop((key, n_seq))
            self.tokens_spent += n_seq * self.seq_len * len(fresh)
            self.evaluations += len(fresh)
        return [self._memo[(k, n_seq)] for k in keys]

    def prefetch(self, choices: Sequence[Sequence[int]], tokens: int) -> None:
        """Score `choices` now, all at once (in parallel where the fitness can), without charging them: a later
        `score` of each is answered from here and charged then, exactly as if it had been scored then. A searcher
        that scores candidates one by one prefetches the next few it will ask for, and its result, accounting
        and stopping are those of the one-by-one search."""
        n_seq = self.sequences_for(tokens)
        keys = [tuple(int(j) for j in c) for c in choices]
        todo = list(dict.fromkeys(k for k in keys if (k, n_seq) not in self._memo and (k, n_seq) not in self._ahead))
        if todo:
            self._ahead.update({(k, n_seq): v for k, v in zip(todo, self._score(todo, n_seq))})

    def _score(self, choices: list[tuple[int, ...]], n_sequences: int) -> list[float]:
        raise NotImplementedError

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def exhausted(self) -> bool:
        """True once a token or time bound is reached; searchers check between rounds and then stop."""
        return (self.max_tokens > 0 and self.tokens_spent >= self.max_tokens) or (
            self.max_seconds > 0 and self.seconds >= self.max_seconds
        )

    def affords(self, tokens: int) -> bool:
        """Whether `tokens` more forward tokens stay within the token bound (always, when unbounded)."""
        return self.max_tokens <= 0 or self.tokens_spent + tokens <= self.max_tokens

    def note_best(self, choice: Sequence[int], value: float, tokens: int) -> None:
        """Record a new incumbent (scored on `tokens` tokens), for quality-vs-tokens curves."""
        self.trace.append(
            {
                "tokens_spent": self.tokens_spent,
                "seconds": round(self.seconds, 3),
                "choice": [int(j) for j in choice],
                "fitness": float(value),
                "fitness_tokens": self.sequences_for(tokens) * self.seq_len,
            }
        )

    def summary(self) -> dict[str, Any]:
        return {
            "tokens_spent": self.tokens_spent,
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 3),
            "trace": self.trace,
        }


class ProxyFitness(Fitness):
    """The problem's additive error, optionally with noise that shrinks as 1/sqrt(sequences), like a sampled loss.
    For tests and for synthetic problems; deterministic for a given (choice, sequences, seed)."""

    def __init__(
        self, problem: AllocationProblem, noise: float = 0.0, seed: int = 0, seq_len: int = 64, pool_sequences: int = 16
    ) -> None:
        super().__init__(seq_len, pool_sequences)
        self.problem = problem
        self.noise = noise
        self.seed = seed

    def _score(self, choices: list[tuple[int, ...]], n_sequences: int) -> list[float]:
        out = []
        for choice in choices:
            value = self.problem.error_of(choice)
            if self.noise:
                digest = hashlib.sha256(repr((choice, n_sequences, self.seed)).encode()).digest()
                rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
                value += self.noise * float(rng.standard_normal()) / math.sqrt(n_sequences)
            out.append(value)
        return out
