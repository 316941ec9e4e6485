"""What the kernels need to run, and compile well, under Triton < 3.7 (the H200 image's Triton 3.6.0) as under 3.7.

patch(): the interpreter under Triton < 3.7 with NumPy >= 2.4.

In the interpreter a scalar loaded with tl.load holds a one-element (1,)-shaped array, and Triton 3.6 turns such a
tensor into a Python int with int(array). NumPy 2.4 removed that conversion for arrays with ndim > 0 ("TypeError:
only 0-dimensional arrays can be converted to Python scalars"), so every kernel whose loop bounds are loaded values
(`for j in range(start, end, ...)` with start = tl.load(row_ptr + row): bitmap, csr8, N:M, BSR) fails in the
interpreter. Triton 3.7 converts int(array.squeeze()); patch() makes 3.6 do the same. Compiled kernels (a GPU, no
TRITON_INTERPRET) are not affected, and with Triton >= 3.7 patch() does nothing.

Each kernel module calls patch() at import; it is idempotent. FLAT_GATHER (below): the compiled decode loops."""

from __future__ import annotations

import triton

_PATCHED = False


def _needs_patch() -> bool:
    if not triton.knobs.runtime.interpret:
        return False
    return _version() < (3, 7)


def patch() -> None:
    global _PATCHED
    if _PATCHED or not _needs_patch():
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):  # the interpreter calls this by its module-global name on every launch
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    _PATCHED = True


def _version() -> tuple[int, int]:
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return major, minor


# Triton 3.6 (as its TTGIR for sm_90 shows) orders the dimensions of a load whose pointer is contiguous along none
# of them (a gather) as [0, 1, ...] (3.7: [..., 1, 0], the last dimension fastest), so a gather in a decode loop gets
# a layout unlike the loop's vector loads and the accumulator, and the loop gains a layout conversion through shared
# memory with barriers. Loading such a gather through a flat (1-D) pointer tensor avoids that. Where the flat load
# compiles the same under 3.7 (bitmap, csr8 at one lane per row) the kernels always use it; where it is worse under
# 3.7 (N:M decode, csr8 at several lanes per row) only under Triton < 3.7, by this flag.
FLAT_GATHER = _version() < (3, 7)
