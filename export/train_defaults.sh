#!/usr/bin/env bash
# Reproduce the shipped default models from phantoms alone (never real data).
#   export/train_defaults.sh [DEVICE] [MINUTES] [WORKDIR]
# DEVICE cuda|cpu; MINUTES caps each training run (the steps reached are recorded in the
# checkpoints and the model card). The segmenter trains alone, then the five inpainters
# (one per resolution of the paper's study) concurrently; MORE_448 extra minutes resume
# the 448 one, which is the slowest to train.
set -euo pipefail
dev=${1:-cuda}
minutes=${2:-6}
work=${3:-runs/defaults}
py=${PYTHON:-python3}
cases=${CASES:-80}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
$py -m bmltrt synth "$work/data" --cases "$cases" --seed 1 -j "${JOBS:-16}" --force
$py -m bmltrt train segmenter --data "$work/data" --out "$work/segmenter" --config cpu \
    --steps "${STEPS_SEG:-4000}" --batch-size 8 --lr 2e-3 --device "$dev" --seed 0 \
    --val-every "${VAL_SEG:-500}" --time-limit "$minutes" > "$work/segmenter.log" 2>&1
for r in ${RESOLUTIONS:-128 192 256 320 448}; do
  $py -m bmltrt train inpainter --data "$work/data" --out "$work/inpainter_$r" --config tiny \
      --resolution "$r" --steps "${STEPS_INP:-8000}" --batch-size 16 --lr 1e-3 --device "$dev" \
      --seed 0 --val-every "${VAL_INP:-1000}" --time-limit "$minutes" > "$work/inpainter_$r.log" 2>&1 &
done
fail=0
for job in $(jobs -p); do wait "$job" || fail=1; done
if [ "${MORE_448:-0}" != "0" ]; then
  $py -m bmltrt train inpainter --data "$work/data" --out "$work/inpainter_448" --config tiny \
      --resolution 448 --steps "${STEPS_INP:-8000}" --batch-size 16 --lr 1e-3 --device "$dev" \
      --seed 0 --val-every "${VAL_INP:-1000}" --time-limit "$MORE_448" --resume >> "$work/inpainter_448.log" 2>&1 || fail=1
fi
tail -n 2 "$work"/*.log
[ $fail = 0 ] || exit 1
$py -m bmltrt export --segmenter "$work/segmenter/checkpoint.pt" --out "$work/models" --precision both \
    $(for r in ${RESOLUTIONS:-128 192 256 320 448}; do echo --inpainter "$work/inpainter_$r/checkpoint.pt"; done)
