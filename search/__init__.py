"""Searchers choosing one option per unit under a cost budget; importing registers them in SEARCHERS."""

from search import bayes, dp, evo, milp, owl, random_search, tyr, uniform, uniform_best  # noqa: F401  (imported for registration)
from search.base import (
    SEARCHERS,
    Allocation,
    AllocationProblem,
    InfeasibleBudget,
    Searcher,
    SearcherConfig,
    make_searcher,
)
from search.fitness import Fitness, ProxyFitness

__all__ = [
    "SEARCHERS", "Allocation", "AllocationProblem", "Fitness", "InfeasibleBudget", "ProxyFitness", "Searcher",
    "SearcherConfig", "make_searcher",
]
