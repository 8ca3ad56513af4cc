#!/usr/bin/env bash
# Reproduce the shipped default models (see MODEL_CARD.md): SynthSeg-style training on the
# real knee label maps of train_labels/ (MIT / BSD-3-Clause) completed into whole legs, plus
# phantom anatomies and a share of `bmltrt synth` phantom scans. Never OAI_AKOA, never real
# scans: painted OAI_AKOA (val split) is only scored at validation, to watch the runs.
#
#   export/train_defaults.sh [DEVICE] [MINUTES] [WORKDIR]
#
# DEVICE cpu|cuda; MINUTES caps each training run (both run at once, one core each, on a
# 2-core CPU; the steps reached are in the checkpoints and the model card). Env: LABELS
# (default ../shared/data/train_labels), OAI (default ../shared/data/labels/OAI_AKOA),
# STEPS_SEG, STEPS_INP, AUTOCAST (bf16 on a CPU with AVX512-BF16, else none), DATA_WORKERS.
set -euo pipefail
dev=${1:-cpu}
minutes=${2:-120}
work=${3:-runs/defaults}
py=${PYTHON:-python3}
labels=${LABELS:-../shared/data/train_labels}
oai=${OAI:-../shared/data/labels/OAI_AKOA}
# bf16 autocast only where it is native (a GPU, or a CPU with AVX512-BF16): emulated, it is
# far slower than float32 (bmltrt.training.loop.cpu_has_native_bf16)
native=bf16
if [ "$dev" = cpu ] && ! $py -c "import sys; from bmltrt.training.loop import cpu_has_native_bf16; sys.exit(cpu_has_native_bf16() is False)"; then native=none; fi
amp=${AUTOCAST:-$native}
# DATA_WORKERS=N (default 0): make the generated scans in N processes (`--data-workers`), for a
# GPU; any N > 0 draws another stream of scans than the shipped runs saw (they used 0)
dw=(--data-workers "${DATA_WORKERS:-0}")
resolutions=128,192,256,320,448
mkdir -p "$work"
[ -f "$work/phantoms/dataset.json" ] || $py -m bmltrt synth "$work/phantoms" --cases 80 --seed 1 -j 2 --force
val=()
if [ -d "$oai" ]; then
  [ -f "$work/oai_painted/dataset.json" ] || $py -m bmltrt synth "$work/oai_painted" --from-labels "$oai" --seed 1 -j 2 --force
  val=(--val-data "$work/oai_painted")
fi
# The anatomy bank is built once (about 9 minutes on 2 cores) and shared by both runs.
$py -c "from bmltrt.training.data import bank_paths; bank_paths('$labels', '$work/anatomy_bank', phantoms=12, workers=2)"
OMP_NUM_THREADS=1 $py -m bmltrt train segmenter --labels "$labels" --bank-cache "$work/anatomy_bank" \
    --data "$work/phantoms" --phantom-fraction 0.1 "${val[@]}" --out "$work/segmenter" --config cpu \
    --steps "${STEPS_SEG:-5000}" --batch-size 2 --lr 2e-3 --device "$dev" --seed 0 --val-every 500 \
    --autocast "$amp" "${dw[@]}" --time-limit "$minutes" > "$work/segmenter.log" 2>&1 &
OMP_NUM_THREADS=1 $py -m bmltrt train inpainter --labels "$labels" --bank-cache "$work/anatomy_bank" \
    --data "$work/phantoms" --phantom-fraction 0.2 "${val[@]}" --out "$work/inpainter" --config tiny \
    --resolution "$resolutions" --steps "${STEPS_INP:-4000}" --batch-size 8 --lr 1e-3 --device "$dev" --seed 0 \
    --val-every 500 --autocast "$amp" "${dw[@]}" --time-limit "$minutes" > "$work/inpainter.log" 2>&1 &
fail=0
for job in $(jobs -p); do wait "$job" || fail=1; done
tail -n 2 "$work"/segmenter.log "$work"/inpainter.log
[ $fail = 0 ] || exit 1
# Stage 2 of the segmenter: lesion-heavy scans (90 % with 1-4 lesions, most of them
# subchondral) at a lower rate, because after stage 1 it still carved bright lesions out
# of the femur, and a lesion outside the femur mask is never repainted, so never found.
OMP_NUM_THREADS=${THREADS_FT:-2} $py -m bmltrt train segmenter --labels "$labels" --bank-cache "$work/anatomy_bank" \
    --data "$work/phantoms" --phantom-fraction 0.1 "${val[@]}" --out "$work/segmenter_ft" \
    --init "$work/segmenter/checkpoint.pt" --lesion-p 0.9 --max-lesions 4 --lr 5e-4 \
    --steps "${STEPS_FT:-1600}" --batch-size 2 --device "$dev" --seed 0 --val-every 400 \
    --autocast "$amp" "${dw[@]}" --time-limit "$minutes" > "$work/segmenter_ft.log" 2>&1
# Stage 3: more lesions (1-6 per scan), 60 % of them small (1.5-6 mm) and touching the
# bone surface under the cartilage, as most real BMLs do: the painted OAI lesions that
# stage 2 still lost lay in the outermost millimetre of the femur. Starts from stage 2's
# best.pt (the step with the best Dice on the fixed generated validation scans). It ran
# with the anatomy bank of seed 3 (built then from --seed; now named by --bank-seed).
OMP_NUM_THREADS=${THREADS_FT:-2} $py -m bmltrt train segmenter --labels "$labels" --bank-cache "$work/anatomy_bank" \
    --data "$work/phantoms" --phantom-fraction 0.1 "${val[@]}" --out "$work/segmenter_surface" \
    --init "$work/segmenter_ft/best.pt" --lesion-p 0.9 --max-lesions 6 --lesion-surface-p 0.6 --lr 3e-4 \
    --steps "${STEPS_SURFACE:-2400}" --batch-size 2 --device "$dev" --seed 3 --bank-seed 3 --val-every 400 \
    --autocast "$amp" "${dw[@]}" --time-limit "$minutes" > "$work/segmenter_surface.log" 2>&1
# Stage 4 (2026-12-06): scans whose fat-suppressed contrasts now and then show muscle as
# dark as the suppressed marrow (labelgen.DARK_MUSCLE_P), as real DESS echo 2 does; stages
# 1-3 of the shipped segmenter never saw that, and it lost the femoral shaft on the real
# qDESS echo 2. Starts from stage 3's best.pt; the shipped run started from the same
# weights as export/segmenter.onnx of 2026-11-25 (`--init export/segmenter.onnx`).
OMP_NUM_THREADS=${THREADS_FT:-2} $py -m bmltrt train segmenter --labels "$labels" --bank-cache "$work/anatomy_bank" \
    --data "$work/phantoms" --phantom-fraction 0.1 "${val[@]}" --out "$work/segmenter_dark" \
    --init "$work/segmenter_surface/best.pt" --lesion-p 0.9 --max-lesions 6 --lesion-surface-p 0.6 --lr 2e-4 \
    --steps "${STEPS_DARK:-1600}" --batch-size 2 --device "$dev" --seed 0 --val-every 400 \
    --autocast "$amp" "${dw[@]}" --time-limit "$minutes" > "$work/segmenter_dark.log" 2>&1
# Stage 5 (2026-12-06): every generated lesion a small surface lesion that also replaces the
# cortex under it (on the 1.6 mm grid a real subchondral plate is thinner than a pixel, so the
# oedema touches the cartilage). Stage 4 carved such lesions out of the femur: 38 % of the
# painted-OAI val misses lay outside its mask. The run was stopped by hand at step 1000 of a
# 2500-step schedule; --stop-at replays that.
OMP_NUM_THREADS=${THREADS_FT:-2} $py -m bmltrt train segmenter --labels "$labels" --bank-cache "$work/anatomy_bank" \
    --data "$work/phantoms" --phantom-fraction 0.1 "${val[@]}" --out "$work/segmenter_breach" \
    --init "$work/segmenter_dark/best.pt" --lesion-p 1 --max-lesions 6 --lesion-surface-p 1 --lesion-breach-p 1 \
    --lr 2e-4 --steps 2500 --stop-at "${STOP_BREACH:-1000}" --batch-size 2 --device "$dev" --seed 1 --val-every 500 \
    --autocast "$amp" "${dw[@]}" --time-limit "$minutes" > "$work/segmenter_breach.log" 2>&1
# Stage 6: back to a mix (90 % of scans with lesions, 70 % of them at the surface, 60 % of those
# breaching), 500 steps of a 4000-step schedule. The shipped segmenter is this step: of the
# checkpoints measured it kept the most painted-OAI val lesion voxels inside the femur (0.70 on
# the grid; steps 1000 and 1500 of the same run fell to 0.49 and 0.36).
OMP_NUM_THREADS=${THREADS_FT:-2} $py -m bmltrt train segmenter --labels "$labels" --bank-cache "$work/anatomy_bank" \
    --data "$work/phantoms" --phantom-fraction 0.1 "${val[@]}" --out "$work/segmenter_mix" \
    --init "$work/segmenter_breach/checkpoint.pt" --lesion-p 0.9 --max-lesions 6 --lesion-surface-p 0.7 \
    --lesion-breach-p 0.6 --lr 1.5e-4 --steps 4000 --stop-at "${STOP_MIX:-500}" --batch-size 2 --device "$dev" \
    --seed 2 --val-every 500 --autocast "$amp" "${dw[@]}" --time-limit "$minutes" > "$work/segmenter_mix.log" 2>&1
$py -m bmltrt export --segmenter "$work/segmenter_mix/checkpoint.pt" --inpainter "$work/inpainter/checkpoint.pt" \
    --resolutions "$resolutions" --default-resolution 256 --precision both --overwrite --out "$work/models"
