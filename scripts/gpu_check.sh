#!/usr/bin/env bash
# One command for a GPU machine (a workstation or a Jetson):
#
#     scripts/gpu_check.sh OUTDIR            # the real check
#     scripts/gpu_check.sh OUTDIR --dry-run  # no installs, numpy only: checks the script on a CPU
#
# 1. reports the GPU (nvidia-smi, CuPy);
# 2. installs what is missing if it can: CuPy for the driver's CUDA major version
#    (cupy-cuda12x / cupy-cuda13x); torch with CUDA only if BMLTRT_INSTALL_TORCH=1 (large);
# 3. runs the GPU tests (tests/test_gpu.py: the whole loop under
#    cupyx.allow_synchronize(False) after the upload, CPU/GPU parity, the backends with cupy)
#    and the sync-free primitives on cupy;
# 4. if TensorRT is installed: `bmltrt build-engines` into OUTDIR/engines, each plan checked
#    with polygraphy against ONNX Runtime on the same inputs, then the GPU tests again with
#    those engines;
# 5. scripts/gpu_check.py: parity on phantom scans (lesion Dice >= 0.98, femur Dice >= 0.99)
#    and per-stage timings of a 448x448x36 scan per backend, with the device name and the
#    date, into OUTDIR/gpu_check.json.
# Everything is logged to OUTDIR/gpu_check.log; the last line says PASSED or FAILED.
set -uo pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [--dry-run]}
DRY=0
[[ "${2:-}" == "--dry-run" ]] && DRY=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
: > "$LOG"
FAILED=()
log() { echo "[gpu_check] $*" | tee -a "$LOG"; }
step() { # step NAME CMD...: run, log, remember a failure
    local name=$1; shift
    log "== $name: $*"
    "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [[ $rc == 0 ]] || { FAILED+=("$name (exit $rc)"); log "$name failed (exit $rc)"; }
    return 0
}

# -- 1. the GPU ------------------------------------------------------------------------
CUDA_MAJOR=""
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 | tee "$OUT/nvidia-smi.csv" | tee -a "$LOG"
    CUDA_MAJOR=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)
elif [[ -e /etc/nv_tegra_release ]]; then
    log "Jetson: $(head -1 /etc/nv_tegra_release)"
    CUDA_MAJOR=12  # JetPack 6
else
    log "no nvidia-smi: no NVIDIA driver here"
fi
log "driver's CUDA major version: ${CUDA_MAJOR:-unknown}"

# -- 2. what is missing ------------------------------------------------------------------
if [[ $DRY == 0 ]]; then
    if ! $PY -c "import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0" >/dev/null 2>&1; then
        if [[ -n "$CUDA_MAJOR" ]]; then
            step "install CuPy" $PY -m pip install -q "cupy-cuda${CUDA_MAJOR}x"
        else
            FAILED+=("CuPy missing and no CUDA version found")
        fi
    fi
    if [[ "${BMLTRT_INSTALL_TORCH:-0}" == 1 ]] && ! $PY -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
        step "install torch (CUDA)" $PY -m pip install -q torch
    fi
fi
step "device" $PY -c "
from bmltrt.doctor import check
for r in check():
    print(f\"{r['component']:12s} {'ok' if r['ok'] else 'missing':8s} {r['version']:12s} {r['detail']}\")"

# -- 3. GPU tests ------------------------------------------------------------------------
if [[ $DRY == 1 ]]; then
    step "GPU tests (they skip on a CPU)" $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py
else
    step "GPU tests" $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_morphology.py tests/test_postprocess.py
fi

# -- 4. TensorRT ---------------------------------------------------------------------------
if $PY -c "import tensorrt" >/dev/null 2>&1; then
    PREC=$($PY -c "
from bmltrt.runtime.models import ModelStore
print('fp16' if 'fp16' in ModelStore.open().precisions('segmenter') else 'fp32')")
    step "build-engines" $PY -m bmltrt build-engines --out "$OUT/engines" --precision "$PREC"
    step "polygraphy" $PY - "$OUT" "$PREC" <<'EOF'
import json, subprocess, sys
from pathlib import Path
from bmltrt.runtime import engines
from bmltrt.runtime.models import ModelStore
from bmltrt.runtime.specs import model_path, model_spec
out, prec = Path(sys.argv[1]), sys.argv[2]
store, bad = ModelStore.open(), 0
tol = ["--atol", "3e-2", "--rtol", "3e-2"] if prec == "fp16" else ["--atol", "1e-3", "--rtol", "1e-3"]
for side in sorted((out / "engines").glob("*.json")):
    meta = json.loads(side.read_text())
    if not side.with_suffix(".plan").exists() or meta.get("precision") != prec:
        continue
    spec = model_spec(store, meta["model"], prec)
    shape = f"{spec.input.name}:{list(spec.input.with_batch(4))}".replace(" ", "")
    onnx = model_path(store, meta["model"], prec)
    io = out / f"polygraphy_{meta['model']}"
    ref = subprocess.run(["polygraphy", "run", str(onnx), "--onnxrt", "--input-shapes", shape,
                          "--save-inputs", f"{io}_in.json", "--save-outputs", f"{io}_ort.json"])
    got = subprocess.run(["polygraphy", "run", str(side.with_suffix(".plan")), "--model-type", "engine", "--trt",
                          "--load-inputs", f"{io}_in.json", "--load-outputs", f"{io}_ort.json", *tol])
    print(f"{meta['model']} {prec}: {'PASSED' if ref.returncode == 0 and got.returncode == 0 else 'FAILED'}")
    bad += ref.returncode != 0 or got.returncode != 0
sys.exit(1 if bad else 0)
EOF
    export BMLTRT_ENGINES="$OUT/engines"
    [[ $DRY == 0 ]] && step "GPU tests with TensorRT" $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py
else
    log "TensorRT not installed: engines not built (x86: pip install tensorrt-cu12 from pypi.nvidia.com; Jetson: JetPack 6)"
fi

# -- 5. parity and timings ---------------------------------------------------------------------
if [[ $DRY == 1 ]]; then
    step "parity and timings (numpy)" $PY scripts/gpu_check.py "$OUT" --cpu ${GPU_CHECK_ARGS:-}
else
    step "parity and timings" $PY scripts/gpu_check.py "$OUT" ${GPU_CHECK_ARGS:-}
fi

if [[ ${#FAILED[@]} == 0 ]]; then
    log "results in $OUT"
    log "PASSED"
    exit 0
fi
log "failed: ${FAILED[*]}"
log "FAILED"
exit 1
