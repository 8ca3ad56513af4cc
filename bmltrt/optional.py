"""Optional imports: GPU and training libraries are loaded only when asked for, so the
runtime installs and runs without torch, TensorRT, CuPy or cuCIM."""

from __future__ import annotations

import importlib
from types import ModuleType


def optional_import(name: str) -> tuple[ModuleType | None, str]:
    """(module, "") when importable, else (None, why)."""
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # ImportError, or a CUDA library failing to load
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


def cupy_with_gpu() -> tuple[ModuleType | None, str]:
    """CuPy only if it imports *and* sees a CUDA device."""
    cp, why = optional_import("cupy")
    if cp is None:
        return None, why
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"CuPy found no usable CUDA device ({type(exc).__name__})"
    if n < 1:
        return None, "CuPy found no CUDA device"
    return cp, ""
