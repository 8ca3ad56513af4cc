"""What can run here: each backend with its version, the GPU, and why a missing one is missing."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys

from bmltrt.optional import cupy_with_gpu, optional_import

_CUDA_LIBS = {"win32": ("nvcuda.dll",)}.get(sys.platform, ("libcuda.so.1", "libcuda.so"))


def cuda_devices() -> tuple[int, str]:
    """(number of CUDA devices, why none) from the CUDA driver itself (cuInit, cuDeviceGetCount).

    This is what decides "is there a GPU": an onnxruntime-gpu or CuPy wheel installs and lists
    CUDA on a machine without one. CUDA_VISIBLE_DEVICES is honoured (the driver applies it),
    and BMLTRT_NO_GPU=1 says "no device" whatever the driver says (to test the CPU paths).
    """
    if os.environ.get("BMLTRT_NO_GPU", "").strip().lower() not in ("", "0", "false", "no", "off"):
        return 0, "no CUDA device (BMLTRT_NO_GPU is set)"
    lib = None
    for name in _CUDA_LIBS:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return 0, "no CUDA driver (libcuda not found): no NVIDIA GPU here"
    try:
        rc = lib.cuInit(0)
        if rc != 0:
            return 0, f"the CUDA driver finds no usable device (cuInit error {rc})"
        n = ctypes.c_int(0)
        rc = lib.cuDeviceGetCount(ctypes.byref(n))
        if rc != 0:
            return 0, f"the CUDA driver cannot count devices (error {rc})"
    except (AttributeError, OSError) as exc:
        return 0, f"the CUDA driver cannot be used ({type(exc).__name__})"
    if n.value < 1:
        return 0, "the CUDA driver finds no device"
    return n.value, ""


def check() -> list[dict]:
    rows = []

    def add(name, ok, version="", detail=""):
        rows.append({"component": name, "ok": bool(ok), "version": version, "detail": detail})

    n_gpu, no_gpu = cuda_devices()
    ort, why = optional_import("onnxruntime")
    detail = ", ".join(ort.get_available_providers()) if ort else why
    if ort is not None and "CUDAExecutionProvider" in ort.get_available_providers() and n_gpu < 1:
        detail += " (the CUDA provider is listed, but there is no CUDA device: it will not be used)"
    add("onnxruntime", ort is not None, getattr(ort, "__version__", ""), detail)
    torch, why = optional_import("torch")
    if torch is None:
        add("torch", False, "", why + " (needed to train, to export and for --backend torch: pip install 'bmltrt[train]')")
    else:
        cuda = torch.cuda.is_available()
        add("torch", True, torch.__version__,
            f"CUDA: {torch.cuda.get_device_name(0)}" if cuda else "CPU only (no CUDA device or CPU build)")
    trt, why = optional_import("tensorrt")
    add("tensorrt", trt is not None, getattr(trt, "__version__", ""),
        "builds FP16 engines" if trt else why + " (install NVIDIA TensorRT >= 10.3 / JetPack 6)")
    cp, why = cupy_with_gpu()
    if cp is None:
        add("cupy", False, "", why)
    else:
        props = cp.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        add("cupy", True, cp.__version__, f"GPU: {name}, compute capability {props['major']}.{props['minor']}")
    cucim, why = optional_import("cucim")
    add("cucim", cucim is not None, getattr(cucim, "__version__", ""),
        "optional; CuPy alone suffices" if cucim else why + " (optional; CuPy alone suffices, e.g. on Jetson)")
    gpu = _nvidia_smi() if n_gpu else ""
    add("gpu", n_gpu > 0, "", (gpu or f"{n_gpu} CUDA device(s)") if n_gpu else no_gpu)
    add("python", True, platform.python_version(), f"{platform.system()} {platform.machine()}")
    return rows


def _nvidia_smi() -> str:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ""
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().replace("\n", "; ")
    except Exception:
        return ""
