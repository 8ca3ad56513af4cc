#!/usr/bin/env bash
# Train the femur segmenter, or the LaMa generator, on a GPU machine in one short call (a lent
# device machine of minutes, or any CUDA workstation), the label-driven scans made by the CPU
# cores meanwhile.
#
#   scripts/gpu_train_prepare.sh               # here, once: labels, anatomy bank, wheels
#   scripts/gpu_train.sh OUTDIR [MINUTES]      # there
#   DEVICE=cpu CONFIG=cfg.json INIT= STEPS=2 BATCH=2 WORKERS=1 scripts/gpu_train.sh OUTDIR 1  # checks it on a CPU
#
# Env (defaults in brackets): NET [segmenter]: segmenter or inpainter; DATA [runs/device]:
# train_labels/ and anatomy_bank/ as gpu_train_prepare.sh leaves them; CONFIG (segmenter [cpu:
# the shipped grid; cpu-1mm is the finer one, benchmarks/results/segmenter_1mm_pilot/];
# inpainter [small: lama-fourier at 3/8 width, ~3.8M parameters]); INIT (segmenter
# [export/segmenter.onnx]; inpainter [none: the shipped generator is "tiny"; give
# export/inpainter_256.onnx with CONFIG=tiny to fine-tune it]; empty: from scratch);
# STEPS [6000] (the learning-rate schedule; --time-limit MINUTES [7] ends the run first on a
# short lease); BATCH [segmenter 8, inpainter 16]; FRESH [3] scans replaced in the pool per
# step; WORKERS [cores - 2]; DEVICE [cuda]; AUTOCAST [bf16]; LR [segmenter 3e-4, inpainter
# 1e-3]; RESOLUTIONS [128,192,256,320,448] (inpainter: one generator for all five, as shipped);
# EXTRA: more `bmltrt train` options. The segmenter's lesion settings are stage 6's
# (export/train_defaults.sh); the inpainter trains on healthy slices, as shipped.
#
# OUTDIR gets gpu_train.log, device.json (machine, date, command) and seg/ (checkpoint.pt,
# best.pt, history.json) or inp/ (history.json, and gen_best.pt, gen_last.pt: the generator's
# weights alone, which `bmltrt export --inpainter` takes; the full checkpoints, with the
# discriminator and the optimisers, are over what a device call brings back, 16 MiB a file,
# and are moved to KEEP [/tmp/bmltrt-gpu-train] on that machine).
# Score the result here: scripts/segmenter_grid_val.py and scripts/real_scans.py on a
# models folder exported with `bmltrt export --from-onnx export/ --segmenter OUTDIR/seg/best.pt`
# (or `--inpainter OUTDIR/inp/gen_best.pt`, then `bmltrt evaluate tune` on a val split).
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

net=${NET:-segmenter}
if [[ $net != segmenter && $net != inpainter ]]; then
    say "error: NET=$net is not segmenter or inpainter"
    exit 2
fi

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
common=(--labels "$DATA/train_labels" --bank-cache "$DATA/anatomy_bank" --steps "${STEPS:-6000}"
        --seed "${SEED:-5}" --val-every "${VAL_EVERY:-500}" --device "$dev" --autocast "${AUTOCAST:-bf16}"
        --data-workers "$workers" --fresh-per-step "${FRESH:-3}" --time-limit "$MINUTES")
case "$net" in
    segmenter)
        init=${INIT-export/segmenter.onnx}
        cmd=($PY -m bmltrt train segmenter "${common[@]}" --out "$OUT/seg" --config "${CONFIG:-cpu}"
             ${init:+--init "$init"} --lesion-p 0.9 --max-lesions 6 --lesion-surface-p 0.7 --lesion-breach-p 0.6
             --lr "${LR:-3e-4}" --batch-size "${BATCH:-8}" ${EXTRA:-}) ;;
    inpainter)
        init=${INIT-}
        cmd=($PY -m bmltrt train inpainter "${common[@]}" --out "$OUT/inp" --config "${CONFIG:-small}"
             ${init:+--init "$init"} --resolution "${RESOLUTIONS:-128,192,256,320,448}"
             --lr "${LR:-1e-3}" --batch-size "${BATCH:-16}" ${EXTRA:-}) ;;
esac
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
say "train $net: rc $rc after $(( $(date +%s) - start )) s"
run_dir="$OUT/seg"
if [[ $net == inpainter ]]; then
    run_dir="$OUT/inp"
    # The generator's weights alone come back; the full checkpoints stay on that machine.
    $PY - "$run_dir" <<'EOF' 2>&1 | tee -a "$LOG"
import os, shutil, sys
import torch
run, keep = sys.argv[1], os.environ.get("KEEP", "/tmp/bmltrt-gpu-train")
os.makedirs(keep, exist_ok=True)
for name, slim in (("best.pt", "gen_best.pt"), ("checkpoint.pt", "gen_last.pt")):
    path = os.path.join(run, name)
    if not os.path.exists(path):
        continue
    ck = torch.load(path, map_location="cpu", weights_only=False)
    doc = {k: v for k, v in ck.items() if k not in ("modules", "optimizers", "rng")}
    doc["modules"] = {"gen": ck["modules"]["gen"]}
    torch.save(doc, os.path.join(run, slim))
    shutil.move(path, os.path.join(keep, name))
    print(f"{slim}: step {ck.get('step')}, {os.path.getsize(os.path.join(run, slim)) / 2**20:.1f} MiB")
EOF
fi
if [[ -f "$run_dir/history.json" ]]; then
    $PY -c "import json,sys; [print(json.dumps(h)) for h in json.load(open(sys.argv[1]))]" "$run_dir/history.json" | tee -a "$LOG"
fi
[[ $rc == 0 ]] && say "PASSED" || say "FAILED"
exit $rc
