#!/usr/bin/env bash
# Train the femur segmenter on a GPU machine in one short call (a lent device machine of
# minutes, or any CUDA workstation), the label-driven scans made by the CPU cores meanwhile.
#
#   scripts/gpu_train_prepare.sh               # here, once: labels, anatomy bank, wheels
#   scripts/gpu_train.sh OUTDIR [MINUTES]      # there
#   DEVICE=cpu CONFIG=cfg.json INIT= STEPS=2 BATCH=2 WORKERS=1 scripts/gpu_train.sh OUTDIR 1  # checks it on a CPU
#
# Env (defaults in brackets): DATA [runs/device]: train_labels/ and anatomy_bank/ as
# gpu_train_prepare.sh leaves them; CONFIG [cpu: the shipped grid; cpu-1mm is the finer one,
# benchmarks/results/segmenter_1mm_pilot/]; INIT [export/segmenter.onnx; empty: from scratch];
# STEPS [6000] (the learning-rate schedule; --time-limit MINUTES [7] ends the run first on a
# short lease); BATCH [8]; FRESH [3] scans replaced in the pool per step; WORKERS [cores - 2];
# DEVICE [cuda]; AUTOCAST [bf16]; LR [3e-4]; EXTRA: more `bmltrt train segmenter` options.
# The generator's lesion settings are stage 6's (export/train_defaults.sh).
#
# OUTDIR gets gpu_train.log, device.json (machine, date, command) and seg/ (checkpoint.pt,
# best.pt, history.json): six files, each a few MB, within what a device call brings back.
# Score the result here: scripts/segmenter_grid_val.py and scripts/real_scans.py on a
# models folder exported with `bmltrt export --from-onnx export/ --segmenter OUTDIR/seg/best.pt`.
set -uo pipefail

OUT=${1:?usage: scripts/gpu_train.sh OUTDIR [MINUTES]}
MINUTES=${2:-7}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${DATA:-runs/device}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_train.log"
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }

for need in "$DATA/train_labels" "$DATA/anatomy_bank"; do
    if [[ ! -d "$need" ]]; then
        say "error: $need is missing | run scripts/gpu_train_prepare.sh first (and carry $DATA)"
        exit 2
    fi
done
# nibabel and MONAI are not on every GPU image: install the wheels carried in .whl/
if ! $PY -c "import nibabel, monai" >/dev/null 2>&1; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        say "error: nibabel or monai is missing and .whl/ holds no wheels | run scripts/gpu_train_prepare.sh first (and carry .whl)"
        exit 2
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bmltrt-site \
        .whl/*.whl >>"$LOG" 2>&1 || { say "error: the carried wheels did not install (see $LOG)"; exit 1; }
    export PYTHONPATH=/tmp/bmltrt-site${PYTHONPATH:+:$PYTHONPATH}
fi

cores=$(nproc)
workers=${WORKERS:-$(( cores > 3 ? cores - 2 : 1 ))}
dev=${DEVICE:-cuda}
init=${INIT-export/segmenter.onnx}
cmd=($PY -m bmltrt train segmenter --labels "$DATA/train_labels" --bank-cache "$DATA/anatomy_bank"
     --out "$OUT/seg" --config "${CONFIG:-cpu}" ${init:+--init "$init"}
     --lesion-p 0.9 --max-lesions 6 --lesion-surface-p 0.7 --lesion-breach-p 0.6
     --lr "${LR:-3e-4}" --steps "${STEPS:-6000}" --batch-size "${BATCH:-8}" --seed "${SEED:-5}"
     --val-every "${VAL_EVERY:-500}" --device "$dev" --autocast "${AUTOCAST:-bf16}"
     --data-workers "$workers" --fresh-per-step "${FRESH:-3}" --time-limit "$MINUTES" ${EXTRA:-})
$PY - "$OUT/device.json" "$dev" "$workers" "${cmd[*]}" <<'EOF' 2>&1 | tee -a "$LOG"
import datetime, json, os, platform, sys
import torch
path, dev, workers, cmd = sys.argv[1:]
gpu = torch.cuda.get_device_name(0) if dev == "cuda" and torch.cuda.is_available() else None
doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": dev,
       "gpu": gpu, "cpu_cores": os.cpu_count(), "data_workers": int(workers), "torch": torch.__version__,
       "python": platform.python_version(), "command": cmd}
open(path, "w").write(json.dumps(doc, indent=1))
print(json.dumps(doc))
EOF
say "$ ${cmd[*]}"
start=$(date +%s)
"${cmd[@]}" >>"$LOG" 2>&1
rc=$?
say "train segmenter: rc $rc after $(( $(date +%s) - start )) s"
if [[ -f "$OUT/seg/history.json" ]]; then
    $PY -c "import json,sys; [print(json.dumps(h)) for h in json.load(open(sys.argv[1]))]" "$OUT/seg/history.json" | tee -a "$LOG"
fi
[[ $rc == 0 ]] && say "PASSED" || say "FAILED"
exit $rc
