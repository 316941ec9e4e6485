"""Where the model and every pass over it run: the `device=` / `device_map=` / `model.dtype` policy, in one place.

- `model.dtype` is applied once, when the model is loaded (allocator/model/loader.py); nothing casts it later (a
  cast would also round buffers that transformers keeps in float32, such as the rotary inverse frequencies).
- `device=` (allocator/core/device.py) is where the work runs. When the model fits that device, `place` moves it
  there once, after the latency table is read (profilers copy what they time themselves); the level database, the
  fitness engine (unit modules are built from levels onto the layer's device, allocator/model/surgery.py), the
  calibration pool, its dense log-probabilities and the scoring passes then all live there.
- A model larger than one GPU stays in CPU memory (its home): the database build streams one decoder layer at a
  time to the device (allocator/levels/compress/layer_stream.py), and each inference pass (the fitness engine's dense
  log-probabilities, the KL and perplexity scores) runs on the model dispatched with accelerate's device_map over
  the visible GPUs, then CPU, then disk, for that pass only (`inference_pass`); the model is unchanged afterwards.
- Everything written (exports) comes from CPU tensors (`on_cpu`), so files do not depend on the device.

`device_map=` chooses the placement: "auto" (default) dispatches only when the resolved device is CUDA and the
weights do not fit FIT_FRACTION of its free memory; "single" never dispatches; "dispatch" always does (on CUDA).
The choice is `needs_dispatch`, a pure function of the sizes, so it is tested without a GPU."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from allocator.core.device import resolve_device
from allocator.core.errors import UserInputError

__all__ = [
    "DEVICE_MAPS",
    "FIT_FRACTION",
    "Placement",
    "check_dtype",
    "inference_pass",
    "input_device",
    "max_memory",
    "needs_dispatch",
    "on_cpu",
    "place",
    "resolve_placement",
    "validate_placement",
]

DEVICE_MAPS = ("auto", "single", "dispatch")
# Share of a GPU's free memory the weights may take and still count as fitting: the rest is for activations, the
# logits of a batch, the fitness engine's built unit modules and its pool's dense log-probabilities.
FIT_FRACTION = 0.85


@dataclass(frozen=True)
class Placement:
    device: torch.device  # where passes run (with dispatch: the first GPU, where inputs go)
    dispatch: bool  # inference passes on the model dispatched over GPUs (+CPU, +disk) by accelerate


def check_dtype(device: torch.device, dtype: str) -> None:
    """One-line error for a dtype the device cannot compute in. CPU: float32, float16 and bfloat16 all run in torch
    2.13 (checked: a tiny Llama's forward in each), so none is refused; CUDA: bfloat16 needs compute capability 8.0+."""
    if device.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise UserInputError(f"model.dtype=bfloat16: {device} ({name}) has no bfloat16 support; valid here: float16, float32")


def validate_placement(device: str, dtype: str, device_map: str) -> torch.device:
    """Checks without loading anything: the device name, the dtype on it, the device_map choice."""
    resolved = resolve_device(device)
    check_dtype(resolved, dtype)
    if device_map not in DEVICE_MAPS:
        raise UserInputError(f"device_map={device_map!r} is unknown; valid: {', '.join(DEVICE_MAPS)}")
    if device_map == "dispatch" and resolved.type != "cuda":
        raise UserInputError(f"device_map=dispatch spreads a model over GPUs, but device={device} is {resolved}; "
                             "valid with a CPU device: auto, single")
    return resolved


def needs_dispatch(device_map: str, device_type: str, weight_bytes: int, free_bytes: int) -> bool:
    """Whether inference passes use an accelerate-dispatched model: `free_bytes` is the resolved device's free memory
    (ignored on a CPU, where the model lives anyway)."""
    if device_type != "cuda" or device_map == "single":
        return False
    return device_map == "dispatch" or weight_bytes > FIT_FRACTION * free_bytes


def max_memory(gpu_free_bytes: Sequence[int], cpu_bytes: int) -> dict[int | str, int]:
    """accelerate's max_memory for a dispatch: FIT_FRACTION of each GPU's free memory, then the CPU's."""
    return {**{i: int(FIT_FRACTION * free) for i, free in enumerate(gpu_free_bytes)}, "cpu": int(cpu_bytes)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameter and buffer storages (a tied lm_head counted once)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def resolve_placement(device: str, dtype: str, device_map: str, model: nn.Module) -> Placement:
    """The run's placement for `model` (already in its dtype) on `device`, reading the device's free memory now."""
    resolved = validate_placement(device, dtype, device_map)
    free = torch.cuda.mem_get_info(resolved)[0] if resolved.type == "cuda" else 0
    return Placement(resolved, needs_dispatch(device_map, resolved.type, weight_bytes(model), free))


def place(model: nn.Module, placement: Placement) -> nn.Module:
    """The model moved, once, to the placement's device (a model on it already is left as it is: on the default CPU
    nothing happens); a model to be dispatched stays at home, in CPU memory. Returns the model."""
    if not placement.dispatch and input_device(model) != placement.device:
        model.to(placement.device)
    return model


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids go: its embedding's device; the CPU for a model dispatched by accelerate, whose hooks
    move inputs to each module's device and bring the outputs back to the inputs' device."""
    if getattr(model, "hf_device_map", None) is not None:
        return torch.device("cpu")
    return model.get_input_embeddings().weight.device


def on_cpu(model: nn.Module) -> nn.Module:
    """The model itself when all its tensors are on the CPU; else a copy with CPU copies of them (the model keeps its
    own), sharing one CPU tensor wherever the model shares one (tied weights, units shared with a dense model)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return model
    memo: dict[int, object] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.detach().cpu(), requires_grad=p.requires_grad)
        for b in module._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = b.cpu()
    return copy.deepcopy(model, memo)


def _cpu_free_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def _tensor_slots(model: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    return [(slots, name, t) for module in model.modules() for slots in (module._parameters, module._buffers)
            for name, t in slots.items() if t is not None]


@contextlib.contextmanager
def inference_pass(model: nn.Module, placement: Placement | None = None,
                   device_map: dict[str, int | str] | None = None) -> Iterator[nn.Module]:
    """`model` ready for inference passes inside the block: as it is unless the placement dispatches, or
    `device_map` (module name → GPU index, "cpu" or "disk") is given; then dispatched with accelerate (a map made
    from the free memory of every visible GPU and the CPU now, when not given) and, after the block, its hooks
    removed and its own tensors put back, so the model, and every model sharing tensors with it, is unchanged."""
    if device_map is None and (placement is None or not placement.dispatch):
        yield model
        return
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_submodules

    slots = _tensor_slots(model)
    if device_map is None:
        free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
        device_map = infer_auto_device_map(model, max_memory=max_memory(free, _cpu_free_bytes()),
                                           no_split_module_classes=getattr(model, "_no_split_modules", None))
    gpus = sorted({d for d in device_map.values() if d not in ("cpu", "disk")}, key=str)
    main = torch.device("cuda", gpus[0]) if gpus and isinstance(gpus[0], int) else (gpus[0] if gpus else "cpu")
    with tempfile.TemporaryDirectory(prefix="offload-") as offload:
        try:
            # force_hooks: a map of one device must not `model.to` it, which would move tensors shared with others
            dispatch_model(model, device_map=dict(device_map), main_device=main, offload_dir=offload, force_hooks=True)
            yield model
        finally:
            remove_hook_from_submodules(model)
            for table, name, tensor in slots:
                table[name] = tensor
            model.__dict__.pop("hf_device_map", None)
