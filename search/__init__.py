"""Searchers choosing one option per unit under a cost budget; importing registers them in SEARCHERS."""

from search import dp, uniform  # noqa: F401  (imported for registration)
from search.base import SEARCHERS, Allocation, AllocationProblem, InfeasibleBudget, Searcher

__all__ = ["SEARCHERS", "Allocation", "AllocationProblem", "InfeasibleBudget", "Searcher"]
