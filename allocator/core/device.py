"""The top-level `device=` setting: where the database build (calibration, OBS, SparseGPT, Fisher) and the fitness
engine run. One function resolves it, so every stage reads the same name the same way.

Default "cpu": a run's levels and allocation then do not depend on which machine it happens on (the latency
profile defaults to the CPU too); "auto" opts into the GPU when one is visible."""

from __future__ import annotations

import re

import torch

from allocator.core.errors import UserInputError

__all__ = ["DEFAULT_DEVICE", "DEVICE_CHOICES", "resolve_device"]

DEFAULT_DEVICE = "cpu"
DEVICE_CHOICES = "cpu, cuda, cuda:N, auto (cuda if available, else cpu)"
_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(name: str | torch.device) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:N", "auto") as a torch.device, checked against what this machine has."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise UserInputError(f"device={name!r} is not a device name; valid: {DEVICE_CHOICES}")
    text = name.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(text)
    if match is None:
        raise UserInputError(f"device={name!r} is unknown; valid: {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise UserInputError(f"device={name!r}: no CUDA device is visible on this machine; valid here: cpu, auto")
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise UserInputError(
            f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0..cuda:"
            f"{torch.cuda.device_count() - 1}"
        )
    return torch.device("cuda", index)
