"""A bench run on disk: bench.json (everything), bench.csv (one figure a row, machine and
commit on each), throughput.png and stages.png (drawn with Pillow alone, like the
evaluation figures: no plotting library in the runtime)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

from bmltrt.bench.run import COLUMNS, STAGES
from bmltrt.evaluation.figure import COLOURS, _font
from bmltrt.io.atomic import atomic_write

W, H = 760, 480
LEFT, RIGHT, TOP, BOTTOM = 70, 230, 50, 60


def write_results(res: dict, out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "csv": out_dir / "bench.csv"}
    atomic_write(paths["json"], lambda p: Path(p).write_text(json.dumps(res, indent=1) + "\n"))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in res["rows"]:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    atomic_write(paths["csv"], lambda p: Path(p).write_text(buf.getvalue()))
    for name, fn in (("throughput", throughput_plot), ("stages", stages_plot)):
        p = fn(res, out_dir / f"{name}.png")
        if p is not None:
            paths[name] = p
    return paths


def _save(img: Image.Image, path: Path) -> Path:
    atomic_write(path, lambda p: img.save(p, format="PNG"))
    return path


def _nice_max(v: float) -> float:
    import math

    if v <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * e:
            return m * e
    return 10 * e


def _frame(title: str, subtitle: str):
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((LEFT, 8), title, fill="black", font=_font(15))
    d.text((LEFT, 28), subtitle, fill=(90, 90, 90), font=_font(11))
    return img, d


def throughput_plot(res: dict, path: Path) -> Path | None:
    """Inpainter slices/s (at each series' best batch size) against resolution."""
    rows = [r for r in res["rows"] if r["section"] == "inpainter" and r.get("median")]
    if not rows:
        return None
    series: dict[str, dict[int, float]] = {}
    for r in rows:
        key = f"{r['backend']} {r['device']} {r['precision']}"
        s = series.setdefault(key, {})
        s[r["resolution"]] = max(s.get(r["resolution"], 0.0), r["median"])
    xs = sorted({r["resolution"] for r in rows})
    ymax = _nice_max(max(v for s in series.values() for v in s.values()))
    img, d = _frame("Inpainter throughput (slices/s, best batch size)",
                    f"{res['machine_label']} | {res['machine']['date']} | commit {res['machine']['commit']}")
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP + 10
    font = _font(11)
    d.line([(x0, y0), (x1, y0)], fill="black")
    d.line([(x0, y0), (x0, y1)], fill="black")

    def px(x):
        return x0 + (x1 - x0) * (xs.index(x) + 0.5) / len(xs)

    def py(y):
        return y0 - (y0 - y1) * y / ymax

    for i in range(6):
        yv = ymax * i / 5
        d.line([(x0 - 4, py(yv)), (x1, py(yv))], fill=(225, 225, 225) if i else "black")
        d.text((x0 - 8, py(yv)), f"{yv:g}", fill="black", font=font, anchor="rm")
    for x in xs:
        d.text((px(x), y0 + 8), str(x), fill="black", font=font, anchor="mt")
    d.text(((x0 + x1) / 2, y0 + 28), "resolution (px)", fill="black", font=font, anchor="mt")
    for k, (name, s) in enumerate(sorted(series.items())):
        col = COLOURS[k % len(COLOURS)]
        pts = [(px(x), py(s[x])) for x in xs if x in s]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=col)
        ly = TOP + 14 + 18 * k
        d.line([(x1 + 12, ly), (x1 + 32, ly)], fill=col, width=3)
        d.text((x1 + 38, ly), name, fill="black", font=font, anchor="lm")
    return _save(img, path)


def stages_plot(res: dict, path: Path) -> Path | None:
    """Seconds per stage of one scan, a stacked bar per backend."""
    rows = [r for r in res["rows"] if r["section"] == "stages" and r["stage"] in STAGES]
    if not rows:
        return None
    bars: dict[str, dict[str, float]] = {}
    for r in rows:
        bars.setdefault(f"{r['backend']} {r['device']} {r['precision']}", {})[r["stage"]] = r["median"] or 0.0
    names = sorted(bars)
    xmax = _nice_max(max(sum(b.values()) for b in bars.values()))
    what = rows[0]["what"]
    img, d = _frame(f"Stages of one {what.replace('scan ', '')} scan (median s), resolution {rows[0]['resolution']}",
                    f"{res['machine_label']} | {res['machine']['date']} | commit {res['machine']['commit']}")
    font = _font(11)
    lab_w = 190
    x0, x1, y0, y1 = lab_w, W - 120, TOP + 10, H - BOTTOM
    bh = min(36, (y1 - y0) / max(1, len(names)) - 8)
    for i in range(6):
        xv = xmax * i / 5
        x = x0 + (x1 - x0) * xv / xmax
        d.line([(x, y0), (x, y1)], fill=(225, 225, 225))
        d.text((x, y1 + 6), f"{xv:g}", fill="black", font=font, anchor="mt")
    d.text(((x0 + x1) / 2, y1 + 24), "seconds", fill="black", font=font, anchor="mt")
    for j, name in enumerate(names):
        top = y0 + 4 + j * (bh + 8)
        d.text((x0 - 6, top + bh / 2), name, fill="black", font=font, anchor="rm")
        x = x0
        for k, st in enumerate(STAGES):
            v = bars[name].get(st, 0.0)
            w = (x1 - x0) * v / xmax
            if w > 0:
                d.rectangle([x, top, x + w, top + bh], fill=COLOURS[k % len(COLOURS)])
            x += w
        d.text((x + 4, top + bh / 2), f"{sum(bars[name].values()):.2f} s", fill="black", font=font, anchor="lm")
    for k, st in enumerate(STAGES):
        ly = y0 + 6 + 18 * k
        d.rectangle([W - 110, ly - 5, W - 98, ly + 5], fill=COLOURS[k % len(COLOURS)])
        d.text((W - 92, ly), st, fill="black", font=font, anchor="lm")
    return _save(img, path)
