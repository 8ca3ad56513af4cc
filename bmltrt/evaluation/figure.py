"""The paper's Figure 3 — Dice and IoU by lesion-size group — drawn with Pillow alone."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from bmltrt.io.atomic import atomic_write

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
W, H = 560, 420  # one panel
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 40, 70


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def series_of(docs: list[dict]) -> tuple[list[dict], list[tuple[str, list[dict], bool]]]:
    """(the groups, [(legend, per-group scores, dashed)]) of every row with size groups."""
    from bmltrt.evaluation.tables import TITLES, _sorted_rows, merge

    doc = merge(docs) if len(docs) > 1 else docs[0]
    several = len(doc.get("model_sets", [])) > 1
    series, groups = [], []
    for r in _sorted_rows(doc):
        g = (r.get("summary") or {}).get("size_groups") or []
        if r["status"] != "ok" or not g:
            continue
        groups = groups or g
        name = TITLES.get(r["method"], r["method"])
        if r["method"] == "ours":
            name = f"ours {r['resolution']}"
        elif r.get("resolution"):
            name += f" {r['resolution']}"
        if several and r.get("models"):
            name += f" [{r['models']}]"
        series.append((name, g, r["method"] != "ours"))
    return groups, series


def size_figure(docs: list[dict], path: Path) -> Path | None:
    groups, series = series_of(docs)
    if not series:
        return None
    img = Image.new("RGB", (2 * W, H + 22 * ((len(series) + 2) // 3) + 10), "white")
    d = ImageDraw.Draw(img)
    f, small = _font(15), _font(12)
    labels = [f"{g['volume_mm3_min']:.0f}-{g['volume_mm3_max']:.0f}" for g in groups]
    for p, (key, title) in enumerate((("dice_mean", "Dice"), ("iou_mean", "IoU"))):
        x0, y0 = p * W + LEFT, TOP
        pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
        d.text((p * W + W // 2, 12), f"{title} by lesion size", fill="black", font=f, anchor="mt")
        for k in range(6):
            y = y0 + ph - ph * k / 5
            d.line([(x0, y), (x0 + pw, y)], fill=(225, 225, 225))
            d.text((x0 - 6, y), f"{k / 5:.1f}", fill="black", font=small, anchor="rm")
        d.rectangle([x0, y0, x0 + pw, y0 + ph], outline="black")
        n = len(groups)
        xs = [x0 + pw * (i + 0.5) / n for i in range(n)]
        for x, lab in zip(xs, labels):
            d.text((x, y0 + ph + 6), lab, fill="black", font=small, anchor="mt")
        d.text((x0 + pw / 2, y0 + ph + 26), "true lesion volume per case (mm3), groups of equal size",
               fill="black", font=small, anchor="mt")
        for s, (name, g, dashed) in enumerate(series):
            col = COLOURS[s % len(COLOURS)]
            pts = [(xs[i], y0 + ph - ph * min(max(v[key] or 0.0, 0.0), 1.0)) for i, v in enumerate(g)]
            for a, b in zip(pts, pts[1:]):
                if dashed:
                    for t in range(0, 10, 2):
                        d.line([(a[0] + (b[0] - a[0]) * t / 10, a[1] + (b[1] - a[1]) * t / 10),
                                (a[0] + (b[0] - a[0]) * (t + 1) / 10, a[1] + (b[1] - a[1]) * (t + 1) / 10)],
                               fill=col, width=2)
                else:
                    d.line([a, b], fill=col, width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
    for s, (name, _, dashed) in enumerate(series):
        x, y = 20 + (s % 3) * (2 * W - 40) // 3, H + 4 + 22 * (s // 3)
        col = COLOURS[s % len(COLOURS)]
        d.line([(x, y + 7), (x + 26, y + 7)], fill=col, width=3 if not dashed else 1)
        d.text((x + 32, y), name, fill="black", font=small)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"), suffix=".png")
