"""The `device=` setting: one resolver, one-line errors for bad names, and the search job validating it."""

from __future__ import annotations

import pytest
import torch

from allocator.app.config import SearchJob
from allocator.app.search_job import validate_search_job
from allocator.core.device import DEFAULT_DEVICE, resolve_device
from allocator.core.errors import UserInputError


def test_cpu_and_auto_resolve() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:", "mps0", "", 3])
def test_unknown_names_fail_with_one_line(bad) -> None:
    with pytest.raises(UserInputError, match="valid: cpu, cuda, cuda:N, auto") as err:
        resolve_device(bad)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_refused(name) -> None:
    with pytest.raises(UserInputError, match="no CUDA device is visible"):
        resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_index_checked() -> None:
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UserInputError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_search_job_default_and_validation() -> None:
    cfg = SearchJob()
    assert cfg.device == DEFAULT_DEVICE == "cpu"
    cfg.model.name = "tiny-llama"
    validate_search_job(cfg)
    cfg.device = "tpu"
    with pytest.raises(UserInputError, match="device='tpu'"):
        validate_search_job(cfg)
