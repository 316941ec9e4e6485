"""problem.json: written and read in one module, the problem comes back exactly; check_optimum on a run directory."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from allocator.app.problem_file import PROBLEM_FILE, load_problem, problem_from_json, problem_json, write_problem
from allocator.core.errors import UserInputError
from search import AllocationProblem
from search.milp import MILPSearcher


def tiny_problem(second: bool = True, ratios: bool = True) -> AllocationProblem:
    rng = np.random.default_rng(0)
    problem = AllocationProblem(
        unit_names=("layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp"),
        unit_kinds=("attn", "mlp", "attn", "mlp"),
        options=((0, 1, 2), ("dense", "nm2:4", "unstructured50"), (0, 2), (0, 128, 256, 384)),
        costs=tuple(rng.uniform(0, 1, k) / 3 for k in (3, 3, 2, 4)),  # floats with long expansions
        errors=tuple(rng.uniform(0, 1, k) * 1e-7 for k in (3, 3, 2, 4)),
        budget=1.6 / 3,
        kept_fractions=(np.array([0.0, 0.5, 1.0]), np.array([1.0, 0.5, 0.5]), np.array([0.0, 1.0]),
                        np.array([0.0, 1 / 3, 2 / 3, 1.0])),
    )
    if second:
        problem = replace(problem, second_costs=tuple(rng.integers(1, 10**9, k).astype(float) for k in (3, 3, 2, 4)),
                          second_budget=3.1e9)
    if ratios:
        problem = replace(problem, outlier_ratios=(0.01, 0.01, 0.07, 0.07))
    return problem


def same_problem(a: AllocationProblem, b: AllocationProblem) -> bool:
    arrays = lambda p, what: [x.tolist() for x in getattr(p, what)] if getattr(p, what) is not None else None
    return (
        a.unit_names == b.unit_names and a.unit_kinds == b.unit_kinds and a.options == b.options
        and a.budget == b.budget and a.second_budget == b.second_budget and a.outlier_ratios == b.outlier_ratios
        and all(arrays(a, w) == arrays(b, w) for w in ("costs", "errors", "second_costs"))
        and all(a.fractions(u).tolist() == b.fractions(u).tolist() for u in range(a.n_units))
    )


@pytest.mark.parametrize("second", [False, True])
@pytest.mark.parametrize("ratios", [False, True])
def test_round_trip_is_exact(tmp_path, second: bool, ratios: bool) -> None:
    problem = tiny_problem(second, ratios)
    path = write_problem(tmp_path, problem, "ms", 12.25)
    assert path == tmp_path / PROBLEM_FILE
    loaded = load_problem(tmp_path)
    assert same_problem(loaded.problem, problem)
    assert (loaded.cost_unit, loaded.fixed_ms) == ("ms", 12.25)
    assert loaded.second_unit == ("bytes" if second else None)
    # the same optimum, to the bit
    assert MILPSearcher().search(loaded.problem).choice == MILPSearcher().search(problem).choice
    assert load_problem(path).problem.budget == problem.budget  # the file itself works too


def test_files_from_before_the_optional_fields_load(tmp_path) -> None:
    data = problem_json(tiny_problem(second=False, ratios=False), "params", 3.0)
    for unit in data["units"]:
        del unit["kept_fraction"]
    data["units"][1]["options"] = [0, 64, 128]  # label options need kept_fraction; old files had counts only
    loaded = problem_from_json(json.loads(json.dumps(data)))
    assert loaded.problem.kept_fractions is None and loaded.problem.fractions(1).tolist() == [0.0, 0.5, 1.0]
    assert loaded.problem.second_costs is None and loaded.second_unit is None


def test_bad_files_name_the_field(tmp_path) -> None:
    data = problem_json(tiny_problem(), "bytes", 0.0)
    del data["units"][2]["error"]
    with pytest.raises(UserInputError, match=r"units\[2\].*'error'"):
        problem_from_json(data)
    with pytest.raises(UserInputError, match="cost_unit='s'"):
        problem_from_json({**problem_json(tiny_problem(), "ms", 0.0), "cost_unit": "s"})
    with pytest.raises(UserInputError, match="layers.0.attn.*costs"):
        bad = problem_json(tiny_problem(), "ms", 0.0)
        bad["units"][0]["cost"] = [0.1]
        problem_from_json(bad)
    with pytest.raises(UserInputError, match="does not exist"):
        load_problem(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="cost_unit"):
        problem_json(tiny_problem(), "seconds", 0.0)


def test_check_optimum_on_a_run_directory(tmp_path, capsys) -> None:
    from allocator.benchmarks.check_optimum import RESULT_FILE, main
    from tests.plans import sample_plan

    problem = tiny_problem()
    write_problem(tmp_path, problem, "ms", 1.0)
    best = MILPSearcher().search(problem)
    sample_plan(best.labels(problem), searcher={"name": "milp", "proxy_error": best.error}).save(tmp_path / "plan.json")
    result = main([str(tmp_path)])
    assert result["run_is_optimum"] and result["run_same_allocation_as_milp"]
    assert result["run_allocation"]["proxy_error"] == best.error == result["milp"]["proxy_error"]
    assert result["dp"]["proxy_error"] >= best.error and result["milp"]["exact"]
    assert json.loads((tmp_path / RESULT_FILE).read_text())["run_is_optimum"] is True
    assert "IS the exact optimum" in capsys.readouterr().out

    # Another allocation that fits, with more error: not the optimum, by how much.
    worse = next(ch for ch in np.ndindex(*(len(o) for o in problem.options))
                 if problem.fits(ch) and problem.error_of(ch) > best.error * 1.01)
    labels = {n: o[j] for n, o, j in zip(problem.unit_names, problem.options, worse)}
    sample_plan(labels).save(tmp_path / "plan.json")
    result = main([str(tmp_path)])
    assert not result["run_is_optimum"]
    assert result["run_excess_over_optimum"] == pytest.approx(problem.error_of(worse) / best.error - 1)

    sample_plan({**labels, "layers.0.mlp": "nm4:8"}).save(tmp_path / "plan.json")
    with pytest.raises(SystemExit, match="'layers.0.mlp' has option 'nm4:8'"):
        main([str(tmp_path)])
