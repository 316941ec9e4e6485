"""`python -m allocator profile`: build or refresh the latency table of a model on this device."""

from __future__ import annotations

from allocator.app.config import ProfileJob
from allocator.core.errors import UserInputError
from allocator.core.formats import resolve_unstructured_format
from allocator.core.space import ModelShape, build_space
from allocator.model.loader import load_model
from profilers.prediction import predicted_dense_ms, predicted_min_ms
from profilers.registry import PROFILES, get_cost_table


def validate_profile_name(name: str) -> None:
    if name not in PROFILES:
        raise UserInputError(f"profile={name!r} is unknown; known: {', '.join(PROFILES.names())}")


def run_profile(cfg: ProfileJob) -> None:
    validate_profile_name(cfg.profile.name)
    loaded = load_model(cfg.model, cfg.cache_dir)
    # No budget here: `auto` resolves as without a regime (bitmap); a search asks for the table its plan needs.
    unstructured = resolve_unstructured_format(cfg.space.unstructured_format, None)
    space = build_space(ModelShape.from_config(loaded.model.config), cfg.space, unstructured)
    table, path = get_cost_table(
        cfg.profile.name, loaded.model, space, cfg.profile, cfg.model.dtype, cfg.cache_dir
    )
    threads = f", {table.fingerprint['threads']} threads" if "threads" in table.fingerprint else ""
    print(f"latency table ({table.source}, {table.fingerprint['device']}{threads}): {path}")
    for name, costs in table.regimes.items():
        dense, fastest = predicted_dense_ms(costs, space.units), predicted_min_ms(costs, space.units)
        most = f"{dense / fastest:.2f}x" if fastest > 0 else "none (fixed cost 0: degenerate)"
        print(
            f"  {name:<12} dense {table.source} {costs.dense_ms:8.3f} ms, predicted {dense:8.3f} ms "
            f"({(dense / costs.dense_ms - 1) * 100:+.1f}%), fixed {costs.fixed_ms:7.3f} ms, max speedup {most}"
        )
        s = costs.stability
        if s is not None:  # CPU tables: profilers/stability.py
            sp, others = s["spread"], s["others_cores"]
            print(
                f"  {'':<12} spread over {sp['rounds']} rounds (p10-p90 / median): dense "
                f"{(sp['dense_p90'] - sp['dense_p10']) * 100:.0f}%, variants' fractions "
                f"{(sp.get('variants_p90', 1.0) - sp.get('variants_p10', 1.0)) * 100:.0f}%; dense re-check "
                f"{s['recheck_start_ms']:.1f} -> {s['recheck_end_ms']:.1f} ms; other processes "
                + ("n/a" if others is None else f"{others:.2f} cores")
                + ("; stable" if s["stable"] else f"; UNSTABLE (kept by profile.allow_unstable): {'; '.join(s['reasons'])}")
            )
