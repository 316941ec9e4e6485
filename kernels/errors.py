"""Errors raised by the sparse formats and kernels."""


class UnsupportedShape(ValueError):
    """A kernel or format got a shape, dtype or pattern it does not handle. The message names the offending value
    and the constraint, so nothing runs silently on input it would compute wrongly."""
