"""Uniform weight average ("model soup", Wortsman et al. 2022) of segmenter checkpoints
fine-tuned from one init. Usage: soup.py OUT.pt A.pt B.pt ..."""
import sys, torch
out, paths = sys.argv[1], sys.argv[2:]
cks = [torch.load(p, weights_only=False, map_location="cpu") for p in paths]
base = cks[0]
sd = {}
for k, v in base["modules"]["net"].items():
    if v.dtype.is_floating_point:
        sd[k] = sum(c["modules"]["net"][k] for c in cks) / len(cks)
    else:
        sd[k] = v  # e.g. BatchNorm's num_batches_tracked
base["modules"]["net"] = sd
base["soup_of"] = paths
torch.save(base, out)
print("soup of", len(cks), "->", out)
