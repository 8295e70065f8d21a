"""Thread count of the OpenBLAS that numpy uses, limited around small products.

On a busy machine, handing a small product to a second BLAS thread costs a scheduler time
slice (~10 ms), far more than the product itself; loops of many small products (the zoo's
reference ops, per-layer factorizations) run them on one thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable, Iterator


@functools.cache
def _openblas_threads() -> tuple[Callable[[int], None], Callable[[], int]] | None:
    """Setter and getter of the thread count of the OpenBLAS numpy uses, where it can be found."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
        for path in sorted(p for p in paths if p.startswith("/")):
            library = ctypes.CDLL(path)
            for prefix, suffix in (
                ("scipy_openblas", "64_"),
                ("scipy_openblas", ""),
                ("openblas", ""),
            ):
                setter = getattr(library, f"{prefix}_set_num_threads{suffix}", None)
                getter = getattr(library, f"{prefix}_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    return setter, getter
    except OSError:
        pass
    return None


@contextlib.contextmanager
def blas_threads(count: int | None) -> Iterator[None]:
    """Limit numpy's OpenBLAS to ``count`` threads inside the block (None: leave as is)."""
    controls = _openblas_threads() if count is not None else None
    if controls is None:
        yield
        return
    setter, getter = controls
    previous = getter()
    setter(count)
    try:
        yield
    finally:
        setter(previous)
