"""`python -m allocator <command> [hydra overrides]` with commands search, profile, export, verify, evaluate;
`python -m allocator summarize <sweep dir>` (no Hydra) re-summarises a `search -m` sweep."""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = (
    "usage: python -m allocator {search,profile,export,verify,evaluate} [key=value ...] [-m for sweeps]\n"
    "       python -m allocator summarize <sweep dir>"
)
COMMANDS = ("search", "profile", "export", "verify", "evaluate")
# evaluate's list options also take one bare value (tasks=arc_easy); its `data=<path>` is the text's path, not
# the search's data group.
LIST_KEYS = {"evaluate": ("tasks", "include_path")}
PATH_DATA = ("evaluate",)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def short_name(text: str, limit: int = 96) -> str:
    """Sweep subdirectory names from the overrides: one path level ('/' in a path override becomes '_'), cut to a
    length every filesystem takes (a hash of the full text keeps cut names unique)."""
    import hashlib

    flat = text.replace("/", "_")
    if len(flat) <= limit and flat == text:
        return flat
    return f"{flat[:limit]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def fresh_dir(base: str) -> str:
    """`base`, else `base-2`, `base-3`, ...: the first one this call creates, so runs started in the same second
    (the run directories are named to the second) never share a directory. Creating it is what makes it atomic;
    Hydra then finds it there. Registered with use_cache, so a job resolves its directory once."""
    path = Path(base)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            n += 1


def _known_options(group: str) -> set[str]:
    return {p.stem for p in (CONF_DIR / group).glob("*.yaml")}


def rewrite_shorthands(overrides: list[str], command: str = "search") -> list[str]:
    """`model=<path or hub id>` and `data=<text file or dir>` are accepted beside the named configs, and a list
    option of LIST_KEYS takes a single value without brackets."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key in LIST_KEYS.get(command, ()) and value and not value.startswith("["):
            out.append(f"{key}=[{value}]")
        elif sep and key == "data" and command in PATH_DATA:
            out.append(f"data.path={value}")
        elif sep and key == "model" and value not in _known_options("model"):
            out.append(f"model.name={value}")
        elif sep and key == "data" and value not in _known_options("data"):
            out += ["data=files", f"data.paths=[{value}]"]
        else:
            out.append(item)
    return out


def _task(command: str):
    def task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from allocator.core.errors import UserInputError
        from search import InfeasibleBudget

        job = OmegaConf.to_object(cfg)
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            if command == "search":
                from allocator.app.search_job import run_search

                run_search(job, out_dir)
            elif command == "profile":
                from allocator.app.profile_job import run_profile

                run_profile(job)
            elif command == "export":
                from allocator.app.export_job import run_export

                run_export(job, out_dir)
            elif command == "evaluate":
                from allocator.app.evaluate_job import run_evaluate

                run_evaluate(job)
            else:
                from allocator.app.verify_job import run_verify

                run_verify(job)
        except (UserInputError, InfeasibleBudget, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return task


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "summarize":  # reads a sweep directory: no config to compose
        from allocator.app.sweep_summary import main as summarize

        sys.exit(summarize(argv[1:]))
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command {argv[0]!r}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    command = argv[0]
    import hydra
    from omegaconf import OmegaConf

    from allocator.app.config import register_configs

    register_configs()
    if not OmegaConf.has_resolver("short"):
        OmegaConf.register_new_resolver("short", short_name)
    if not OmegaConf.has_resolver("fresh"):
        OmegaConf.register_new_resolver("fresh", fresh_dir, use_cache=True)
    sys.argv = [f"allocator {command}", *rewrite_shorthands(argv[1:], command)]
    hydra.main(config_path=str(CONF_DIR), config_name=command, version_base="1.3")(_task(command))()


if __name__ == "__main__":
    main()
