"""`python -m allocator profile`: build or refresh the latency table of a model on this device."""

from __future__ import annotations

from profilers.prediction import predicted_dense_ms, predicted_min_ms
from allocator.app.config import ProfileJob
from allocator.core.errors import UserInputError
from allocator.model.loader import load_model
from allocator.core.space import ModelShape, build_space
from profilers.registry import PROFILES, get_cost_table


def validate_profile_name(name: str) -> None:
    if name not in PROFILES:
        raise UserInputError(f"profile={name!r} is unknown; known: {', '.join(PROFILES.names())}")


def run_profile(cfg: ProfileJob) -> None:
    validate_profile_name(cfg.profile.name)
    loaded = load_model(cfg.model, cfg.cache_dir)
    space = build_space(ModelShape.from_config(loaded.model.config), cfg.space)
    table, path = get_cost_table(
        cfg.profile.name, loaded.model, space, cfg.profile, cfg.model.dtype, cfg.cache_dir
    )
    threads = f", {table.fingerprint['threads']} threads" if "threads" in table.fingerprint else ""
    print(f"latency table ({table.source}, {table.fingerprint['device']}{threads}): {path}")
    for name, costs in table.regimes.items():
        dense, fastest = predicted_dense_ms(costs, space.units), predicted_min_ms(costs, space.units)
        print(
            f"  {name:<12} dense {table.source} {costs.dense_ms:8.3f} ms, predicted {dense:8.3f} ms "
            f"({(dense / costs.dense_ms - 1) * 100:+.1f}%), fixed {costs.fixed_ms:7.3f} ms, max speedup {dense / fastest:.2f}x"
        )
