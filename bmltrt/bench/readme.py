"""The README's performance section, generated from a `bmltrt bench` result (never typed in).

    python -m bmltrt.bench.readme benchmarks/results/bench_<machine>_<date> --readme README.md

replaces what lies between ``<!-- bench: ...`` and ``<!-- bench: end -->`` with tables made
from ``bench.json`` (a folder or the file itself); without ``--readme`` it prints them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bmltrt.bench.run import STAGES
from bmltrt.errors import BmlError
from bmltrt.io.atomic import replace_marked_block

BEGIN = "<!-- bench: made by `python -m bmltrt.bench.readme RESULTS --readme README.md`; do not edit by hand -->"
END = "<!-- bench: end -->"


def load_results(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "bench.json"
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise BmlError(f"cannot read a bench result ({type(exc).__name__})", path, "pass a `bmltrt bench` -o folder")
    if res.get("format") != "bmltrt-bench-1":
        raise BmlError("not a bmltrt bench result", path)
    return res


def _f(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def _target(r) -> str:
    b = r["backend"].replace("torch-eager/torch", "PyTorch eager (torch.fft)").replace(
        "torch-eager/matmul", "PyTorch eager (DFT matmul)")
    return f"{b} {r['device']} {r['precision']}"


def _table(head, rows) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def markdown(res: dict) -> str:
    m, rows = res["machine"], res["rows"]
    sec = lambda s: [r for r in rows if r["section"] == s]  # noqa: E731
    libs = ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items() if k != "bmltrt")
    st = res["settings"]
    lines = [f"Measured by `bmltrt bench{' --quick' if st.get('quick') else ''}` on **{res['machine_label']}**, "
             f"{m['date']}, commit `{m['commit']}`, {st['threads']} thread(s); {libs}. Median of "
             f"{st['repeats']} runs after {st['warmup']} warm-up (min–max in `bench.csv`). Models: "
             f"`{Path(res['models_dir']).name}/`.", ""]

    stages = sec("stages")
    if stages:
        by: dict = {}
        for r in stages:
            by.setdefault(_target(r), {})[r["stage"]] = r
        what = stages[0]["what"]
        lines += [f"**Stages of one {what.replace('scan ', '')} phantom scan** (seconds, resolution "
                  f"{stages[0]['resolution']}; peak RSS of the bench process, every backend loaded — the large-scan "
                  f"check below is a fresh process):", ""]
        head = ["backend"] + [s.replace("_", " ") for s in STAGES] + ["total", "peak RSS"]
        body = []
        for name, d in by.items():
            any_r = next(iter(d.values()))
            body.append([name] + [_f(d.get(s, {}).get("median")) for s in STAGES]
                        + [f"**{_f(d.get('total', {}).get('median'))}**", f"{_f(any_r.get('peak_host_mib'), '{:.0f}')} MiB"])
        lines += _table(head, body) + [""]

    ratios = [r for r in sec("ratio") if r["what"] == "eager fp32 / ours, per stage"]
    if ratios:
        lines += ["**PyTorch eager float32 vs ours** (eager time / our time per stage; >1: ours faster; the "
                  "eager networks are `bmltrt.models` built from the manifest's configs):", ""]
        by = {}
        for r in ratios:
            by.setdefault(_target(r), {})[r["stage"]] = r["median"]
        head = ["ours"] + [s.replace("_", " ") for s in ("segment", "inpaint", "total")]
        lines += _table(head, [[n] + [_f(d.get(s), "{:.2f}x") for s in ("segment", "inpaint", "total")]
                               for n, d in by.items()]) + [""]

    inp = sec("inpainter")
    if inp:
        res_list = sorted({r["resolution"] for r in inp})
        best: dict = {}
        for r in inp:
            k = (_target(r), r["resolution"])
            if k not in best or r["median"] > best[k]["median"]:
                best[k] = r
        names = list(dict.fromkeys(_target(r) for r in inp))
        macs = {r["resolution"]: r["median"] for r in sec("macs") if r["what"].startswith("inpainter")}
        lines += ["**Inpainter throughput** (slices/s at the best batch size, in brackets):", ""]
        body = [["GMAC/slice (graph)"] + [_f(macs.get(x, 0) / 1e9 if x in macs else None, "{:.2f}") for x in res_list]]
        for n in names:
            body.append([n] + [(f"{best[(n, x)]['median']:.1f} ({best[(n, x)]['batch']})" if (n, x) in best else "–")
                               for x in res_list])
        lines += _table(["backend"] + [str(x) for x in res_list], body) + [""]

    seg = sec("segmenter")
    if seg:
        best = {}
        for r in seg:
            if _target(r) not in best or r["median"] > best[_target(r)]["median"]:
                best[_target(r)] = r
        mac = next((r["median"] for r in sec("macs") if r["what"] == "segmenter"), None)
        lines += [f"**Segmenter** ({_f(mac / 1e9 if mac else None, '{:.2f}')} GMAC per patch): "
                  + "; ".join(f"{n} {r['median']:.2f} patches/s (batch {r['batch']})" for n, r in best.items()), ""]

    other = [r for r in sec("ratio") if r["what"] != "eager fp32 / ours, per stage"
             and not r["what"].endswith("ours / eager fp32 throughput")]
    if other:
        lines += ["**Other ratios** (throughput, same batch; per resolution at the largest batch measured):", ""]
        body = []
        groups: dict = {}
        for r in other:
            groups.setdefault((r["what"], _target(r), r["stage"]), []).append(r)
        for (what, name, net), rs in groups.items():
            r = max(rs, key=lambda x: x["batch"] or 0)
            body.append([what, name, net, r["batch"], _f(r["median"], "{:.2f}x"), r["note"]])
        lines += _table(["ratio", "backend", "network", "batch", "value", "note"], body) + [""]

    scal = sec("scaling")
    if scal:
        lines += ["**Scaling** (ONNX Runtime float32 unless stated; time of the whole run):", ""]
        body = []
        for r in scal:
            if r["stage"] in ("linear", "not linear"):
                continue
            body.append([r["what"], r["batch"], _f(r["median"]), _f(r.get("per_unit_s"), "{:.3f}"),
                         _f(r.get("peak_host_mib"), "{:.0f}")])
        lines += _table(["what", "n", "seconds", "seconds per unit", "peak RSS MiB"], body) + [""]
        for r in scal:
            if r["stage"] in ("linear", "not linear"):
                lines.append(f"- {r['what']}: **{r['stage']}** — {r['note']}")
        lines.append("")
    for r in sec("memory_check"):
        lines += [f"**Large scan**: {r['what']}: peak RSS {_f(r['median'], '{:.0f}')} MiB — {r['note']}.", ""]
    roof = sec("roofline")
    if roof:
        lines += ["**Roofline** (best batch; MACs counted from the graph × measured throughput):", ""]
        lines += _table(["network", "backend", "GMAC/s", "of peak"],
                        [[r["what"], _target(r), _f(r["median"], "{:.1f}"),
                          _f(100 * r["fraction_of_peak"] if r.get("fraction_of_peak") is not None else None,
                             "{:.1f}%")] for r in roof]) + [""]
        peak_notes = sorted({r["note"].split("(", 1)[1].rstrip(")") for r in roof if r.get("fraction_of_peak")})
        if peak_notes:
            lines += ["Peak used: " + "; ".join(peak_notes), ""]
    if res.get("notes"):
        lines += ["Notes: " + " ".join(n.rstrip(".") + "." for n in res["notes"]), ""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, res: dict) -> Path:
    return replace_marked_block(readme, BEGIN, END, markdown(res), "bench")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a `bmltrt bench` -o folder or its bench.json")
    ap.add_argument("--readme", type=Path, default=None, help="README to update between the bench markers")
    a = ap.parse_args(argv)
    try:
        res = load_results(a.results)
        if a.readme:
            update_readme(a.readme, res)
            print(f"updated {a.readme}")
        else:
            sys.stdout.write(markdown(res))
    except BmlError as err:
        print(f"error: {err.line()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
