"""The TensorRT engine cache: where plans live, what each was built for, whether it fits.

A serialised engine (a "plan") runs only with the TensorRT version and on the GPU model
that built it. So every plan ``<model>_<precision>_<key>.plan`` has a JSON sidecar
(``.json``, same stem) with its identity, and the file name holds a hash of it:

    ONNX sha256 | TensorRT version | GPU name | compute capability | precision | profile

`bmltrt build-engines` builds what is missing or stale and skips what fits; the
TensorRT backend loads only a plan whose sidecar matches this machine and refuses any
other with one line that says what it was built for. Pure logic here, testable without
TensorRT or a GPU; the builder is in `trt_build`, the runtime in `tensorrt_backend`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bmltrt.errors import BmlError
from bmltrt.io.checksum import file_sha256
from bmltrt.optional import cupy_with_gpu, optional_import

FORMAT = "bmltrt-engine-1"
MIN_TENSORRT = (10, 3)  # JetPack 6
IDENTITY_FIELDS = ("format", "model", "precision", "onnx_sha256", "tensorrt", "gpu", "compute_capability", "profile")

INSTALL_TENSORRT = ("install TensorRT >= 10.3: on x86 `pip install tensorrt-cu12` (CUDA 12) or `tensorrt-cu13` "
                    "(CUDA 13) from NVIDIA's index (pypi.nvidia.com); on a Jetson it comes with JetPack 6 "
                    "(python3-libnvinfer)")
INSTALL_CUPY = "install CuPy for your CUDA (`pip install cupy-cuda12x` or `cupy-cuda13x`) and an NVIDIA driver"


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"

    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") + "-sm" + self.compute_capability.replace(".", "")


def current_gpu() -> GpuInfo:
    """The GPU the engines are for (CuPy's current device), or one line saying why none."""
    cp, why = cupy_with_gpu()
    if cp is None:
        raise BmlError(f"no CUDA GPU: {why}", hint=INSTALL_CUPY)
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return GpuInfo(name, f"{props['major']}.{props['minor']}")


def parse_version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(v))[:3])


def require_tensorrt(here: str = "use --backend onnxruntime here"):
    """The tensorrt module, >= 10.3, or one line saying what to install (`here`: what to do
    on this machine when it has no GPU)."""
    trt, why = optional_import("tensorrt")
    if trt is None:
        from bmltrt.doctor import cuda_devices

        n, gpu_why = cuda_devices()
        if n == 0:  # installing TensorRT would not be enough: say so now
            raise BmlError(f"TensorRT is not installed, and this machine has no GPU ({gpu_why})",
                           hint=f"{here}; on a GPU machine, " + INSTALL_TENSORRT)
        raise BmlError(f"TensorRT is not installed ({why})", hint=INSTALL_TENSORRT)
    ver = getattr(trt, "__version__", "0")
    if parse_version(ver) < MIN_TENSORRT:
        raise BmlError(f"TensorRT {ver} is too old (bmltrt needs >= 10.3)", hint=INSTALL_TENSORRT)
    return trt


def default_engines_dir() -> Path:
    """$BMLTRT_ENGINES; in a source checkout <repo>/engines; else ~/.cache/bmltrt/engines."""
    if os.environ.get("BMLTRT_ENGINES"):
        return Path(os.environ["BMLTRT_ENGINES"])
    repo = Path(__file__).resolve().parents[2]
    if (repo / "engines" / "README.md").exists():
        return repo / "engines"
    return Path.home() / ".cache" / "bmltrt" / "engines"


def identity(model: str, precision: str, onnx_sha256: str, tensorrt: str, gpu: GpuInfo, profile: dict) -> dict:
    """What a plan is tied to. `profile`: {input: (min, opt, max) shapes}."""
    return {"format": FORMAT, "model": model, "precision": precision, "onnx_sha256": onnx_sha256,
            "tensorrt": str(tensorrt), "gpu": gpu.name, "compute_capability": gpu.compute_capability,
            "profile": {k: [list(map(int, s)) for s in v] for k, v in sorted(profile.items())}}


def engine_key(ident: dict) -> str:
    return hashlib.sha256(json.dumps({k: ident[k] for k in IDENTITY_FIELDS}, sort_keys=True).encode()).hexdigest()


def plan_path(engines_dir: Path, ident: dict) -> Path:
    return Path(engines_dir) / f"{ident['model']}_{ident['precision']}_{engine_key(ident)[:16]}.plan"


def sidecar_path(plan: Path) -> Path:
    return Path(plan).with_suffix(".json")


def write_plan(engines_dir: Path, ident: dict, plan_bytes: bytes, extra: dict | None = None) -> Path:
    """Write the plan and its sidecar (each atomically; the sidecar last)."""
    from bmltrt.io.atomic import atomic_write

    engines_dir = Path(engines_dir)
    engines_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_path(engines_dir, ident)
    atomic_write(plan, lambda p: Path(p).write_bytes(plan_bytes), suffix=".plan")
    meta = {**ident, "key": engine_key(ident), "plan_file": plan.name, "plan_bytes": len(plan_bytes),
            "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
            "built": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **(extra or {})}
    atomic_write(sidecar_path(plan), lambda p: Path(p).write_text(json.dumps(meta, indent=1, sort_keys=True)))
    return plan


def read_sidecar(plan: Path) -> dict | None:
    try:
        meta = json.loads(sidecar_path(plan).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _profile_text(profile: dict) -> str:
    if not profile:
        return "?"
    mins, opts, maxs = zip(*[(v[0][0], v[1][0], v[2][0]) for v in profile.values()])
    return f"batch {min(mins)}..{max(maxs)} (opt {max(opts)})"


def mismatch(meta: dict, expected: dict) -> str:
    """Why a plan with sidecar `meta` does not fit `expected`, in words ('' if it fits)."""
    if meta.get("format") != FORMAT:
        return f"unknown sidecar format {meta.get('format')!r}"
    env_meta = (meta.get("tensorrt"), meta.get("gpu"), meta.get("compute_capability"))
    env_exp = (expected["tensorrt"], expected["gpu"], expected["compute_capability"])
    if env_meta != env_exp:
        return (f"built for TensorRT {env_meta[0]} on {env_meta[1]} (compute capability {env_meta[2]}); "
                f"this is TensorRT {env_exp[0]} on {env_exp[1]} (compute capability {env_exp[2]})")
    if meta.get("onnx_sha256") != expected["onnx_sha256"]:
        return (f"built from another ONNX file (sha256 {str(meta.get('onnx_sha256'))[:12]}, "
                f"now {expected['onnx_sha256'][:12]})")
    if meta.get("precision") != expected["precision"] or meta.get("model") != expected["model"]:
        return f"built for {meta.get('model')} {meta.get('precision')}"
    if meta.get("profile") != expected["profile"]:
        return f"built for {_profile_text(meta.get('profile') or {})}, wanted {_profile_text(expected['profile'])}"
    return ""


def check_plan(plan: Path, expected: dict, verify_hash: bool = True) -> tuple[bool, str]:
    """(True, '') when `plan` exists, its sidecar matches `expected` and the file is the one
    that was built; else (False, why)."""
    plan = Path(plan)
    if not plan.exists():
        return False, "not built"
    meta = read_sidecar(plan)
    if meta is None:
        return False, f"{sidecar_path(plan).name} is missing or unreadable"
    why = mismatch(meta, expected)
    if why:
        return False, why
    if verify_hash and meta.get("plan_sha256") != file_sha256(plan):
        return False, "the plan file changed after it was built (truncated or replaced)"
    return True, ""


def candidates(engines_dir: Path, model: str, precision: str) -> list[tuple[Path, dict | None]]:
    """Plans of `model` at `precision` in the folder, with their sidecars."""
    d = Path(engines_dir)
    if not d.is_dir():
        return []
    return [(p, read_sidecar(p)) for p in sorted(d.glob(f"{model}_{precision}_*.plan"))]


def find_plan(engines_dir: Path, model: str, precision: str, onnx_sha256: str, tensorrt: str,
              gpu: GpuInfo, need_batch: int = 1) -> tuple[Path, dict]:
    """A plan that fits this model file, TensorRT and GPU (any profile whose maximum batch
    is at least `need_batch`; the largest wins), or one line saying why there is none."""
    fresh, stale = [], []
    for plan, meta in candidates(engines_dir, model, precision):
        if meta is None:
            stale.append((plan, f"{sidecar_path(plan).name} is missing or unreadable"))
            continue
        expected = {**meta, "onnx_sha256": onnx_sha256, "tensorrt": str(tensorrt), "gpu": gpu.name,
                    "compute_capability": gpu.compute_capability, "model": model, "precision": precision,
                    "format": FORMAT}
        ok, why = check_plan(plan, expected)
        if ok:
            max_batch = min(v[2][0] for v in meta["profile"].values()) if meta.get("profile") else 0
            if max_batch >= need_batch:
                fresh.append((max_batch, plan, meta))
            else:
                stale.append((plan, f"its maximum batch is {max_batch}, {need_batch} needed"))
        else:
            stale.append((plan, why))
    if fresh:
        _, plan, meta = max(fresh, key=lambda t: t[0])
        return plan, meta
    hint = f"run `bmltrt build-engines --precision {precision}` on this machine"
    if stale:
        plan, why = stale[0]
        raise BmlError(f"the TensorRT engine for {model} ({precision}) does not fit: {why}", plan, hint)
    raise BmlError(f"no TensorRT engine for {model} ({precision}) in {engines_dir}", engines_dir, hint)


def tensorrt_ready(store, engines_dir, precision: str) -> bool:
    """Could `--backend auto` use TensorRT here: TensorRT, a GPU, and fitting plans for the
    segmenter and the default inpainter?"""
    trt, _ = optional_import("tensorrt")
    if trt is None or parse_version(getattr(trt, "__version__", "0")) < MIN_TENSORRT:
        return False
    try:
        from bmltrt.runtime.specs import model_path

        gpu = current_gpu()
        d = Path(engines_dir) if engines_dir else default_engines_dir()
        for model in ("segmenter", f"inpainter_{store.default_resolution}"):
            find_plan(d, model, precision, file_sha256(model_path(store, model, precision)), trt.__version__, gpu)
    except BmlError:
        return False
    return True
