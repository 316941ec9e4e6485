"""SparseLinear over every format: matches F.linear, survives a safetensors round trip of its state dict, works in
nn.Sequential, under torch.compile, and after load_state_dict; the format registry."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kernels import formats
from kernels.errors import UnsupportedShape
from kernels.sparse_linear import SparseLinear

from .kernel_checks import generated_on_cpu, kernel_device, on_cpu  # noqa: F401 (fixtures)

# On CUDA (compiled kernels) where present and TRITON_INTERPRET is unset, else on the CPU under the interpreter.
pytestmark = pytest.mark.usefixtures("kernel_device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# (format, params, shape): irregular shapes within each format's constraints (nm: K % m, bsr: both % block).
CASES = [
    ("bitmap", {}, (37, 50)),
    ("bitmap", {"tile": (16, 32)}, (5, 129)),
    ("nm", {"n": 2, "m": 4}, (37, 52)),
    ("bsr", {"block": (16, 16)}, (48, 80)),
    ("csr8", {}, (37, 300)),
]


@generated_on_cpu
def sparse_weight(fmt: str, params: dict, shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    n, k = shape
    if fmt == "nm":  # keep the 2 largest of every 4
        groups = w.reshape(n, k // 4, 4)
        drop = groups.abs().argsort(-1)[..., :2]
        groups.scatter_(-1, drop, 0.0)
    elif fmt == "bsr":  # drop about half of the 16x16 blocks
        bn, bk = params["block"]
        keep = torch.rand(n // bn, k // bk, generator=g) < 0.5
        w *= keep.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    else:
        w[torch.rand(shape, generator=g) < 0.6] = 0
    return w.to(dtype)


def assert_linear(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """y within two output ulps of the fp64 result, scaled by the magnitudes summed into each output."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    assert y.dtype == x.dtype and y.shape == exact.shape
    err = (y.double() - exact).abs()
    assert bool((err <= 2 * EPS[x.dtype] * (scale + 1e-3)).all()), f"max err {err.max().item()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,params,shape", CASES)
def test_matches_f_linear(fmt, params, shape, dtype):
    w = sparse_weight(fmt, params, shape, dtype)
    b = torch.randn(shape[0]).to(dtype)
    m = SparseLinear.from_dense(w, b, fmt, **params)
    assert (m.out_features, m.in_features) == shape
    assert torch.equal(m.to_dense(), w)
    for x in (torch.randn(shape[1]), torch.randn(3, shape[1]), torch.randn(2, 9, shape[1])):
        x = x.to(dtype)
        assert_linear(m(x), x, w, b)
    no_bias = SparseLinear.from_dense(w, None, fmt, **params)
    x = torch.randn(4, shape[1]).to(dtype)
    assert_linear(no_bias(x), x, w, None)


@pytest.mark.parametrize("fmt,params,shape", CASES)
def test_state_dict_round_trip_through_safetensors(fmt, params, shape, tmp_path, on_cpu):
    w = sparse_weight(fmt, params, shape, torch.float16, seed=3)
    b = torch.randn(shape[0]).half()
    m = SparseLinear.from_dense(w, b, fmt, **params)
    save_file(m.state_dict(), tmp_path / "m.safetensors")
    loaded = load_file(tmp_path / "m.safetensors")
    assert set(loaded) == set(m.state_dict())
    assert {"layout", "bias", "weight_shape"} <= set(loaded)
    back = SparseLinear.from_state_dict(loaded)
    assert back.fmt == fmt and repr(back) == repr(m)
    for key, t in m.state_dict().items():
        assert torch.equal(back.state_dict()[key], t), key
    x = torch.randn(5, shape[1]).half()
    assert torch.equal(back(x), m(x))
    assert back.weight_nbytes == m.weight_nbytes < w.numel() * w.element_size()


def test_load_state_dict_into_existing_module_and_dtype_cast():
    w = sparse_weight("bitmap", {}, (20, 30), torch.float32)
    m = SparseLinear.from_dense(w, torch.randn(20), "bitmap")
    other = SparseLinear.from_dense(torch.zeros_like(w).masked_fill(w != 0, 1.0), torch.zeros(20), "bitmap")
    other.load_state_dict(m.state_dict())
    x = torch.randn(2, 30)
    assert torch.equal(other(x), m(x))
    half = m.to(torch.float16)  # casts values and bias; the integer tensors keep their dtype
    assert half.weight_values.dtype == torch.float16 and half.weight_bitmap.dtype == torch.int32
    assert_linear(half(x.half()), x.half(), w.half(), half.bias)


def test_inside_sequential_and_compile():
    w1 = sparse_weight("bitmap", {}, (24, 40), torch.float32, seed=1)
    w2 = sparse_weight("nm", {"n": 2, "m": 4}, (9, 24), torch.float32, seed=2)
    model = nn.Sequential(
        SparseLinear.from_dense(w1, torch.randn(24), "bitmap"), nn.ReLU(), SparseLinear.from_dense(w2, None, "nm")
    )
    x = torch.randn(3, 40)
    expect = F.linear(F.relu(F.linear(x, w1, model[0].bias)), w2)
    torch.testing.assert_close(model(x), expect)
    sd = model.state_dict()
    assert "0.weight_values" in sd and "2.weight_indices" in sd
    rebuilt = nn.Sequential(
        SparseLinear.from_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("0.")}),
        nn.ReLU(),
        SparseLinear.from_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("2.")}),
    )
    assert torch.equal(rebuilt(x), model(x))
    # The custom ops have fake kernels, so torch.compile traces through them without a graph break.
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expect)


def test_extra_repr_and_properties():
    w = sparse_weight("bitmap", {}, (37, 50), torch.float32)
    m = SparseLinear.from_dense(w, None, "bitmap")
    assert m.density == pytest.approx(float((w != 0).float().mean()))
    assert f"density={m.density:.3f}" in repr(m) and "format=bitmap" in repr(m) and "bias=False" in repr(m)
    assert m.weight_nbytes == m.compressed().nbytes


def test_registry():
    assert set(formats.FORMATS) == {"bitmap", "nm", "bsr", "csr8"}
    w = sparse_weight("nm", {}, (8, 16), torch.float32)
    c = formats.compress("nm", w, n=2, m=4)
    assert torch.equal(formats.decompress("nm", c), w)
    with pytest.raises(ValueError, match="bitmap, bsr, csr8, nm"):
        formats.compress("csr", w)
    with pytest.raises(ValueError, match="csr"):
        SparseLinear.from_dense(w, None, "csr")
    with pytest.raises(ValueError, match="code 9"):
        formats.format_of(9)
    # Headers travel as ints and come back as the same tensors.
    for fmt, params, shape in CASES:
        t = formats.compress(fmt, sparse_weight(fmt, params, shape, torch.float32), **params).tensors()
        data, headers = formats.split_tensors(fmt, t)
        back = formats.join_tensors(fmt, data, headers)
        assert set(back) == set(t) and all(torch.equal(back[k], t[k]) for k in t)
        assert formats.shape_of(fmt, headers) == shape


def test_bad_state_dict_and_bias():
    m = SparseLinear.from_dense(torch.eye(16), None, "bitmap")
    sd = m.state_dict()
    with pytest.raises(ValueError, match="layout"):
        SparseLinear.from_state_dict({k: v for k, v in sd.items() if k != "layout"})
    with pytest.raises(ValueError, match="unexpected keys"):
        SparseLinear.from_state_dict({**sd, "weight": torch.eye(16)})
    with pytest.raises(ValueError, match=r"\(15,\)"):
        SparseLinear.from_dense(torch.eye(16), torch.zeros(15), "bitmap")
    with pytest.raises(UnsupportedShape, match="in_features=16"):
        m(torch.randn(2, 15))


@pytest.fixture
def no_kernel(monkeypatch, on_cpu):
    """CPU tensors as a CPU runs them outside the tests (conftest sets TRITON_INTERPRET=1, which routes them to the
    interpreted kernel): no kernel, the ops' torch reference."""
    from kernels import ops

    monkeypatch.setattr(ops, "backend", lambda device: "torch-reference")


@pytest.mark.parametrize("fmt,params,shape", CASES)
def test_cpu_decompresses_once_and_runs_the_dense_unit(fmt, params, shape, monkeypatch, no_kernel):
    """On a CPU (no kernel: the ops' torch reference) the weight is decompressed on the first call only and the
    call is the dense unit's F.linear, bit for bit; the compressed buffers and the state dict are unchanged."""
    w = sparse_weight(fmt, params, shape, torch.float32)
    b = torch.randn(shape[0])
    m = SparseLinear.from_dense(w, b, fmt, **params)
    keys = sorted(m.state_dict())
    calls = []
    real = formats.decompress
    monkeypatch.setattr(formats, "decompress", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 7, shape[1])
    assert not m.decompressed
    for _ in range(3):
        assert torch.equal(m(x), F.linear(x, w, b))
    assert len(calls) == 1 and m.decompressed
    assert sorted(m.state_dict()) == keys  # the dense copy is no buffer: export and weight_nbytes as before
    with pytest.raises(UnsupportedShape, match="differs from the weight's"):
        m(x.half())


def test_cpu_dense_copy_follows_the_buffers(no_kernel):
    """A cast, an in-place change of the compressed values or a load_state_dict rebuilds the dense weight."""
    w = sparse_weight("bitmap", {}, (37, 50), torch.float32)
    m = SparseLinear.from_dense(w, None, "bitmap")
    x = torch.randn(3, 50)
    assert torch.equal(m(x), F.linear(x, w))
    m.to(torch.bfloat16)
    assert torch.equal(m(x.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
    m.to(torch.float32)
    rounded = w.bfloat16().float()  # the cast back keeps bf16's rounding: a stale fp32 copy would not
    assert not torch.equal(rounded, w) and torch.equal(m(x), F.linear(x, rounded))
    m.weight_values.mul_(2.0)
    assert torch.equal(m(x), F.linear(x, 2.0 * rounded))
    other = 3.0 * w  # the same non-zeros (load_state_dict keeps buffer shapes), other values
    donor = SparseLinear.from_dense(other, None, "bitmap")
    fresh = SparseLinear.from_state_dict(donor.state_dict())
    assert torch.equal(fresh(x), F.linear(x, other))
    m.load_state_dict(donor.state_dict())
    assert torch.equal(m(x), F.linear(x, other))
