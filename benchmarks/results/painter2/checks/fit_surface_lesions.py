"""One-off check (2026-12-06): can the cpu segmenter fit generated surface lesions at all?
Train it (from the stage-4 checkpoint) on 6 fixed generated fat-suppressed IW scans full of
surface lesions that breach the cortex; measure, on those same scans, the share of lesion
voxels it calls femur (and its femur Dice). Run from the repository root:

    python benchmarks/results/painter2/checks/fit_surface_lesions.py BANK_DIR STAGE4_CKPT OUT.json [LESION_WEIGHT] [STEPS]
"""
import sys, time, json, numpy as np, torch
from glob import glob
from bmltrt.training.data import LabelBank
from bmltrt.synth.labelgen import segmenter_sample
from bmltrt.models.unetpp import SEGMENTER_PRESETS, build_segmenter, SegmenterLogits
from bmltrt.training.checkpoint import load_weights
from bmltrt.training.segmenter import dice_ce_loss, random_crops
from bmltrt.runtime.sliding_window import sliding_window
torch.set_num_threads(2)
bank_dir, init, out_json = sys.argv[1:4]
lw = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 600
cfg = SEGMENTER_PRESETS["cpu"]
bank = LabelBank(sorted(glob(f"{bank_dir}/*.npz")))
rng = np.random.default_rng(7)
samples = []
while len(samples) < 6:
    s = segmenter_sample(bank.pick(rng), rng, 1.6, lesion_p=1.0, max_lesions=6, surface_p=1.0, breach_p=1.0, family="iw_fs")
    if s.lesion is not None and s.lesion.sum() > 20:
        samples.append(s)
vols = [(None, s.image, s.femur, s.spacing, s.lesion) for s in samples]
print("lesion voxels per scan", [int(s.lesion.sum()) for s in samples], flush=True)
net = build_segmenter(cfg).to(memory_format=torch.channels_last_3d)
net.load_state_dict(load_weights(init, "segmenter", "net"))
wrapped = SegmenterLogits(net)
def measure():
    net.eval(); les_in = les_all = 0; d = []
    for s in samples:
        with torch.no_grad():
            p = sliding_window(s.image, cfg.patch, lambda b: wrapped(torch.from_numpy(b)).float().numpy(), 2, cfg.overlap)[1] > 0.5
        les_in += int((p & s.lesion).sum()); les_all += int(s.lesion.sum())
        t = s.femur > 0.5; d.append(2 * (p & t).sum() / (p.sum() + t.sum()))
    net.train(); return les_in / les_all, float(np.mean(d))
opt = torch.optim.AdamW(net.parameters(), lr=2e-4, weight_decay=1e-5)
hist = [{"step": 0, "lesion_in_femur": None, "femur_dice": None}]
hist[0]["lesion_in_femur"], hist[0]["femur_dice"] = measure(); print(hist[0], flush=True)
t0 = time.time()
for i in range(1, steps + 1):
    x, y, les = random_crops(vols, cfg.patch, 2, rng, with_lesions=True)
    x, y, les = torch.from_numpy(x).contiguous(memory_format=torch.channels_last_3d), torch.from_numpy(y), torch.from_numpy(les)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lg = net(x)
    lg = [l.float() for l in lg] if isinstance(lg, (list, tuple)) else lg.float()
    loss = dice_ce_loss(lg, y, les, lw, 0.0)
    opt.zero_grad(); loss.backward(); opt.step()
    if i % 150 == 0:
        a, b = measure(); hist.append({"step": i, "lesion_in_femur": a, "femur_dice": b, "seconds": time.time() - t0, "loss": float(loss.detach())})
        print(hist[-1], flush=True)
json.dump({"lesion_weight": lw, "steps": steps, "scans": 6, "machine": "AMD EPYC, 2 cores", "date": time.strftime("%Y-%m-%d"),
           "command": "python benchmarks/results/painter2/checks/fit_surface_lesions.py " + " ".join(sys.argv[1:]),
           "history": hist}, open(out_json, "w"), indent=1)
