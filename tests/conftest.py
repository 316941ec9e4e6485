import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, so CI checks them against their torch references.
# Set before any kernel module is imported: @triton.jit reads it when the kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from allocator.core.config import ModelConfig, SpaceConfig
from allocator.core.space import ModelShape, build_space
from allocator.model.loader import load_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random Llama (3 layers, GQA 4 heads / 2 KV groups) with its space."""
    loaded = load_model(ModelConfig(name="tiny-llama", tiny_layers=3), tmp_path_factory.mktemp("cache"))
    shape = ModelShape.from_config(loaded.model.config)
    return loaded, build_space(shape, SpaceConfig(mlp_step=32))


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "allocator", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def mixed_allocation(units) -> dict[str, int]:
    """Every kind of option at least once: dropped, partial and dense units."""
    return {u.name: u.options[i % len(u.options)] for i, u in enumerate(units)}


torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A profile with profile.threads set changes torch's thread count for the process; later tests (and the table
    keys they compute, which hold the thread count) must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
