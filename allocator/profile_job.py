"""`python -m allocator profile`: build or refresh the latency table of a model on this device."""

from __future__ import annotations

from allocator.budget import predicted_dense_ms, predicted_min_ms
from allocator.config import ProfileJob
from allocator.errors import UserInputError
from allocator.model_loader import load_model
from allocator.space import ModelShape, build_space
from profilers.cpu import profile_cpu

PROFILERS = ("cpu",)


def validate_profile_name(name: str) -> None:
    if name not in PROFILERS:
        raise UserInputError(f"profile={name!r} is unknown; known: {', '.join(PROFILERS)}")


def run_profile(cfg: ProfileJob) -> None:
    validate_profile_name(cfg.profile.name)
    loaded = load_model(cfg.model, cfg.cache_dir)
    shape = ModelShape.from_config(loaded.model.config)
    units = build_space(shape, cfg.space)
    table, path = profile_cpu(loaded.model, shape, units, cfg.profile, cfg.model.dtype, cfg.cache_dir)
    print(f"latency table ({table.source}, {table.fingerprint['device']}, {table.fingerprint['threads']} threads): {path}")
    for name, costs in table.regimes.items():
        dense, fastest = predicted_dense_ms(costs, units), predicted_min_ms(costs, units)
        print(
            f"  {name:<12} dense measured {costs.dense_ms:8.1f} ms, predicted {dense:8.1f} ms "
            f"({(dense / costs.dense_ms - 1) * 100:+.1f}%), fixed {costs.fixed_ms:6.1f} ms, max speedup {dense / fastest:.2f}x"
        )
