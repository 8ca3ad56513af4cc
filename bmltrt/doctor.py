"""What can run here: each backend with its version, the GPU, and why a missing one is missing."""

from __future__ import annotations

import platform
import shutil
import subprocess

from bmltrt.optional import cupy_with_gpu, optional_import


def check() -> list[dict]:
    rows = []

    def add(name, ok, version="", detail=""):
        rows.append({"component": name, "ok": bool(ok), "version": version, "detail": detail})

    ort, why = optional_import("onnxruntime")
    add("onnxruntime", ort is not None, getattr(ort, "__version__", ""),
        ", ".join(ort.get_available_providers()) if ort else why)
    torch, why = optional_import("torch")
    if torch is None:
        add("torch", False, "", why + " (only needed to train and export: pip install 'bmltrt[train]')")
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
    gpu = _nvidia_smi()
    add("gpu", bool(gpu), "", gpu or "no NVIDIA GPU found (nvidia-smi absent or silent)")
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
