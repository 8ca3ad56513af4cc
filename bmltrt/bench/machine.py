"""Who measured: the machine and software every benchmark figure belongs to."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIBRARIES = ("bmltrt", "numpy", "scipy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "monai", "cupy-cuda12x",
             "cupy-cuda13x", "tensorrt", "nibabel", "scikit-image")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_mhz() -> float | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def git_commit(repo: Path = REPO) -> str:
    """HEAD's short hash, with ``+dirty`` when the tracked files differ; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict:
    """Installed versions, read from the package metadata (nothing imported)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def gpu_names() -> list[str]:
    """GPU names from nvidia-smi (empty without a driver)."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        return [x.strip() for x in r.stdout.splitlines() if x.strip()] if r.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        return []


def machine_info() -> dict:
    info = {"date": datetime.date.today().isoformat(),
            "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu": cpu_name(), "cores": usable_cores(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "system": f"{platform.system()} {platform.machine()}",
            "host": platform.node(), "gpus": gpu_names(), "commit": git_commit(),
            "libraries": library_versions(),
            "threads": {"BMLTRT_THREADS": os.environ.get("BMLTRT_THREADS", ""),
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}}
    # flat copies of the two most asked versions (older readers of machine_info used them)
    for k in ("onnxruntime", "numpy"):
        if k in info["libraries"]:
            info[k] = info["libraries"][k]
    return info


def machine_label(info: dict) -> str:
    """Short name for every figure: CPU (cores) [+ GPU]."""
    s = f"{info.get('cpu', '?')} ({info.get('cores', '?')} cores)"
    if info.get("gpus"):
        s += " + " + info["gpus"][0]
    return s


def machine_slug(info: dict) -> str:
    """Folder-name-safe machine name: the GPU's if there is one, else the CPU's."""
    name = (info.get("gpus") or [info.get("cpu", "cpu")])[0]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    slug = re.sub(r"-(processor|cpu|with-radeon-graphics)$", "", slug)
    return (slug[:40].strip("-") or "machine") + f"-{info.get('cores', 0)}c"
