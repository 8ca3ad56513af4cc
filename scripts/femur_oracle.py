"""How much of the lesion loss is the segmenter's? Pooled lesion Dice of one split with the
predicted femur and with the TRUE femur in its place (same inpainter, same post-processing).

    python scripts/femur_oracle.py DATA --params benchmarks/results/oai_painted_test/postprocess.json \
        --split test --resolution 256 -o benchmarks/results/femur_oracle

DATA is a `bmltrt synth` dataset (phantoms or `--from-labels`); --params a postprocess.json
written by `bmltrt evaluate --tune` (its settings for --resolution, chosen on the val split).
The shipped models (or --models) on ONNX Runtime CPU. Writes femur_oracle.json.
"""

from __future__ import annotations

import _painted

def main(argv=None) -> int:
    a = _painted.parser(__doc__, "test").parse_args(argv)
    det = _painted.detector(a)
    acc = {"predicted femur": [0, 0, 0], "true femur": [0, 0, 0]}
    for cid, scan, norm, true_femur, truth in _painted.cases(a):
        for name, femur in (("predicted femur", det.segment_femur(norm, scan.spacing)), ("true femur", true_femur)):
            composite, keep = det.inpaint(norm, femur, scan.spacing)
            _painted.add_counts(acc[name], det.postprocess(norm, composite, femur, keep, scan.spacing), truth)
        print(cid, {k: v[:] for k, v in acc.items()}, flush=True)
    results = {k: _painted.pooled(*v) for k, v in acc.items()}
    _painted.write(a, det, "femur_oracle.py", "femur_oracle.json", pooled_lesion=results)
    for k, v in results.items():
        print(f"{k}: pooled Dice {v['dice']:.3f}, sensitivity {v['sensitivity']:.3f}, precision {v['precision']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
