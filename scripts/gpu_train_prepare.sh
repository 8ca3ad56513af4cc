#!/usr/bin/env bash
# Here, before scripts/gpu_train.sh runs on a GPU machine that cannot reach a registry:
#
#   scripts/gpu_train_prepare.sh [LABELS]
#
# 1. runs/device/train_labels: a copy of LABELS (default ../shared/data/train_labels, MIT /
#    BSD-3 knee label maps; runs/ is ignored by git: never commit them);
# 2. runs/device/anatomy_bank: the anatomy bank of those labels (copied from
#    runs/defaults/anatomy_bank or $BANK where it is built, else built: ~9 minutes on 2 cores);
# 3. .whl/: wheels of nibabel and MONAI for Python 3.12 (ignored by git), which a GPU image
#    with PyTorch may lack;
# 4. prints what travels: the device tool sends at most 64 MiB with the repository.
# Then, with the device tool: run `bash scripts/gpu_train.sh $OUT 7` carrying runs/device and .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
labels=${1:-../shared/data/train_labels}
bank=${BANK:-runs/defaults/anatomy_bank}
[[ -d "$labels" ]] || { echo "error: no label maps at $labels | give the folder of train_labels" >&2; exit 2; }
rm -rf runs/device.tmp
mkdir -p runs/device.tmp/anatomy_bank
cp -r "$labels" runs/device.tmp/train_labels
[[ -d "$bank" ]] && cp "$bank"/*.npz runs/device.tmp/anatomy_bank/ 2>/dev/null || true
# keeps the variants this bank needs (phantoms 12, bank seed 0, as the recipe), builds what is missing
$PY - <<'EOF'
from pathlib import Path
from bmltrt.training.data import bank_paths
keep = {p.resolve() for p in bank_paths("runs/device.tmp/train_labels", "runs/device.tmp/anatomy_bank", phantoms=12, workers=2)}
for p in Path("runs/device.tmp/anatomy_bank").glob("*.npz"):
    if p.resolve() not in keep:
        p.unlink()
print(f"anatomy bank: {len(keep)} variants")
EOF
rm -rf runs/device && mv runs/device.tmp runs/device
mkdir -p .whl
for pkg in monai==1.6.1 nibabel==5.4.2; do
    name=${pkg%%==*}
    compgen -G ".whl/${name}-*.whl" >/dev/null || $PY -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl "$pkg"
done
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carried=$(du -cb runs/device .whl | tail -1 | cut -f1)
echo "travels: $(( (tracked + carried) / 1048576 )) MiB of 64 (repository $(( tracked / 1048576 )), runs/device and .whl $(( carried / 1048576 )))"
echo "next, with the device tool: run command='bash scripts/gpu_train.sh \$OUT 7' carry=['runs/device', '.whl'] timeout_s=600"
