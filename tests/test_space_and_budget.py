import pytest

from allocator.core.budget import validate_budget
from allocator.core.config import BudgetConfig, SpaceConfig
from allocator.core.errors import UserInputError
from allocator.core.space import ModelShape, build_space, mlp_levels
from profilers.prediction import predicted_dense_ms, target_latency_ms
from profilers.table import RegimeCosts, clean_curve

SHAPE = ModelShape(num_layers=2, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate=128, vocab=257)


def test_mlp_levels_are_hardware_friendly():
    assert mlp_levels(128, SpaceConfig(mlp_step=32)) == (0, 32, 64, 96, 128)
    assert mlp_levels(100, SpaceConfig(mlp_step=32, allow_drop=False)) == (32, 64, 96, 100)
    with pytest.raises(UserInputError, match="multiple of space.width_multiple=8"):
        mlp_levels(128, SpaceConfig(mlp_step=12))
    with pytest.raises(UserInputError, match="must be in 1..128"):
        mlp_levels(128, SpaceConfig(mlp_step=256))


def test_space_has_attention_and_mlp_unit_per_layer():
    space = build_space(SHAPE, SpaceConfig(mlp_step=64))
    units = space.units
    assert [u.name for u in units] == ["layer00.attn", "layer00.mlp", "layer01.attn", "layer01.mlp"]
    assert units[0].options == (0, 1, 2) and units[1].options == (0, 64, 128)


def test_clean_curve_is_non_increasing_as_pruning_grows():
    cleaned = clean_curve({0: 0.0, 32: 3.0, 64: 2.0, 96: 5.0, 128: 4.5})
    assert cleaned == {0: 0.0, 32: 3.0, 64: 3.0, 96: 5.0, 128: 5.0}


def costs() -> RegimeCosts:
    return RegimeCosts({}, fixed_ms=10.0, dense_ms=50.0, unit_ms={"attn": {0: 0, 1: 5, 2: 8}, "mlp": {0: 0, 64: 6, 128: 12}})


def test_speedup_target_and_unreachable_budget_names_the_range():
    space = build_space(SHAPE, SpaceConfig(mlp_step=64))
    units = space.units
    assert predicted_dense_ms(costs(), units) == 50.0
    assert target_latency_ms(BudgetConfig(speedup=2.0, headroom=0.0), costs(), units, "cpu") == 25.0
    assert target_latency_ms(BudgetConfig(speedup=2.0, headroom=0.25), costs(), units, "cpu") == 20.0
    # reachable only without headroom: planned at the fastest reachable latency, not refused
    assert target_latency_ms(BudgetConfig(speedup=4.9, headroom=0.25), costs(), units, "cpu") == 10.0
    with pytest.raises(UserInputError, match=r"budget.speedup=50.0 is unreachable .* achievable speedup 1.00-5.00x"):
        target_latency_ms(BudgetConfig(speedup=50.0), costs(), units, "cpu")
    with pytest.raises(UserInputError, match=r"budget.latency_ms=5.0 is unreachable"):
        target_latency_ms(BudgetConfig(speedup=None, latency_ms=5.0), costs(), units, "cpu")


@pytest.mark.parametrize(
    "budget, message",
    [
        (BudgetConfig(speedup=None), "set one of budget.speedup"),
        (BudgetConfig(speedup=1.5, latency_ms=3.0), "set one of budget.speedup"),
        (BudgetConfig(speedup=0.5), "must be >= 1.0"),
        (BudgetConfig(speedup=None, latency_ms=-1.0), "must be > 0"),
        (BudgetConfig(headroom=0.7), "budget.headroom=0.7 must be in"),
    ],
)
def test_bad_budgets(budget, message):
    with pytest.raises(UserInputError, match=message):
        validate_budget(budget)
