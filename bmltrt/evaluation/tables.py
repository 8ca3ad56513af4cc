"""Table 1 and Figure 3 from evaluation documents: printed, JSON, CSV, Markdown, PNG.

One document is one `bmltrt evaluate` run (one data set and split, one or more models
folders). Several documents (two data sets; two models folders evaluated apart) combine
into one Markdown report, grouped by data set, models folders side by side; the README's
results section is that report's short form, pasted between two markers by
`bmltrt evaluate table ... --readme README.md`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from bmltrt.errors import BmlError
from bmltrt.io.atomic import atomic_write, replace_marked_block

# Qin et al., Table 1 (OAI test set, 45 subjects). The paper states neither the region of
# specificity/accuracy nor whether scores are pooled or per-case means.
PAPER_TABLE1 = [
    {"method": "ours", "resolution": 128, "dice": 0.32, "iou": 0.21, "sensitivity": 0.65, "specificity": 0.87, "accuracy": 0.85},
    {"method": "ours", "resolution": 192, "dice": 0.35, "iou": 0.24, "sensitivity": 0.63, "specificity": 0.91, "accuracy": 0.88},
    {"method": "ours", "resolution": 256, "dice": 0.39, "iou": 0.27, "sensitivity": 0.59, "specificity": 0.92, "accuracy": 0.90},
    {"method": "ours", "resolution": 320, "dice": 0.38, "iou": 0.27, "sensitivity": 0.59, "specificity": 0.91, "accuracy": 0.90},
    {"method": "ours", "resolution": 448, "dice": 0.42, "iou": 0.30, "sensitivity": 0.60, "specificity": 0.94, "accuracy": 0.91},
    {"method": "mkd", "resolution": 320, "dice": 0.15, "iou": 0.10, "sensitivity": 0.79, "specificity": 0.48, "accuracy": 0.49},
    {"method": "mkd", "resolution": 448, "dice": 0.20, "iou": 0.12, "sensitivity": 0.68, "specificity": 0.70, "accuracy": 0.69},
]
PAPER_NOTE = ("paper: Qin et al. Table 1, OAI IW-TSE test set (45 subjects, real BMLs); it does not say over "
              "which region specificity and accuracy are counted, nor whether scores are pooled or per-case means")
METRICS = ("dice", "iou", "sensitivity", "specificity", "accuracy")
SHORT = {"dice": "Dice", "iou": "IoU", "sensitivity": "Sens", "specificity": "Spec", "accuracy": "Acc"}
TITLES = {"ours": "ours (LaMa)", "intensity": "HE intensity threshold", "autoencoder": "autoencoder",
          "mkd": "MKD"}
README_BEGIN = "<!-- results: made by `bmltrt evaluate table ... --readme README.md`; do not edit by hand -->"
README_END = "<!-- results: end -->"


def paper_row(method: str, resolution) -> dict | None:
    return next((p for p in PAPER_TABLE1 if p["method"] == method and p["resolution"] == resolution), None)


def _f(v, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def flat_rows(doc: dict) -> list[dict]:
    """One flat record per table row: every score, both regions, pooled and per-case mean,
    with the paper's numbers beside (the CSV's columns)."""
    out = []
    for r in doc["rows"]:
        f = {"data": doc["data"]["path"], "split": doc["data"]["split"], "n_cases": doc["data"]["n_cases"],
             "method": r["method"], "title": r.get("title"), "models": r.get("models"),
             "resolution": r.get("resolution"), "status": r["status"], "note": r.get("note", "")}
        s = r.get("summary")
        for region in ("volume", "femur"):
            for kind in ("pooled", "per_case_mean"):
                for m in METRICS:
                    f[f"{region}_{m}_{kind}"] = s[region][kind].get(m) if s else None
        lw = s["lesion_wise"] if s else {}
        f.update({"lesions_true": lw.get("n_true"), "lesions_predicted": lw.get("n_pred"),
                  "lesion_sensitivity": lw.get("sensitivity"), "lesion_precision": lw.get("precision"),
                  "lesion_f1": lw.get("f1"), "femur_dice_mean": r.get("femur_dice_mean"),
                  "map_seconds_per_scan": r.get("map_seconds_per_scan"),
                  "params": json.dumps(r.get("params")) if r.get("params") else "",
                  "params_source": r.get("params_source", "")})
        p = paper_row(r["method"], r.get("resolution"))
        for m in METRICS:
            f[f"paper_{m}"] = p[m] if p else None
        out.append(f)
    return out


def csv_text(doc: dict) -> str:
    rows = flat_rows(doc)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["method"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def cases_csv_text(doc: dict) -> str:
    rows = doc.get("cases") or []
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _label(r: dict, several_models: bool) -> str:
    t = TITLES.get(r["method"], r["method"])
    if several_models and r.get("models") and (r["method"] == "ours" or r.get("femur_from", r["models"])):
        t += f" [{r['models']}]"
    return t


def _sorted_rows(doc: dict) -> list[dict]:
    order = {"ours": 0, "intensity": 1, "autoencoder": 2, "mkd": 3}
    labels = [m["label"] for m in doc.get("model_sets", [])]
    return sorted(doc["rows"], key=lambda r: (order.get(r["method"], 9),
                                              labels.index(r["models"]) if r.get("models") in labels else 0,
                                              r.get("resolution") or 0))


def caption(doc: dict) -> str:
    d = doc["data"]
    # the label maps' folder, as the dataset records it (OAI_AKOA, train_labels, ...)
    maps = f"{d['labels_from']} label maps" if d.get("labels_from") else "label maps"
    kind = {"phantom": "knee phantoms (`bmltrt synth`)", "labels": f"{maps} painted by "
            "`bmltrt synth --from-labels`"}.get(d["mode"], d["mode"])
    if d.get("painter"):
        kind += f" (painter {d['painter']})"
    be = doc["backend"]
    return (f"{d['split']} split of `{d['path']}` — {kind}: {d['n_cases']} cases, {d['n_lesions']} true lesions "
            f"(3D components); {be['name']} {be['device']} {be['precision']}; {doc['date'][:10]}")


def table1_markdown(doc: dict) -> str:
    """Table 1 as the paper gives it (pooled scores; Sens/Spec/Acc over the true femur),
    the paper's number after each of ours, and lesion-wise F1."""
    several = len(doc.get("model_sets", [])) > 1
    head = ["method", "size"]
    for m in METRICS:
        head += [SHORT[m], "paper"]
    head += ["lesion F1"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    for r in _sorted_rows(doc):
        p = paper_row(r["method"], r.get("resolution"))
        cells = [_label(r, several), str(r.get("resolution") or "native")]
        if r["status"] != "ok":
            cells += [r.get("note", "not run"), _f(p and p["dice"], 2)]
            for m in METRICS[1:]:
                cells += ["", _f(p and p[m], 2)]
            cells += [""]
        else:
            s = r["summary"]
            for m in METRICS:
                region = "volume" if m in ("dice", "iou") else "femur"
                cells += [_f(s[region]["pooled"][m]), _f(p and p[m], 2) if p else ""]
            cells += [_f(s["lesion_wise"]["f1"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_markdown(doc: dict) -> str:
    """Every score: Dice/IoU pooled and per-case mean; Sens/Spec/Acc pooled over the true
    femur and over the whole volume; lesion-wise sensitivity/precision/F1; femur Dice."""
    several = len(doc.get("model_sets", [])) > 1
    head = ["method", "size", "Dice pooled", "Dice mean", "IoU pooled", "IoU mean", "Sens femur", "Spec femur",
            "Acc femur", "Sens volume", "Spec volume", "Acc volume", "lesion Sens", "lesion Prec", "lesion F1",
            "femur Dice", "parameters (val)"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    for r in _sorted_rows(doc):
        if r["status"] != "ok":
            continue
        s = r["summary"]
        v, fe, lw = s["volume"], s["femur"], s["lesion_wise"]
        cells = [_label(r, several), str(r.get("resolution") or "native"),
                 _f(v["pooled"]["dice"]), _f(v["per_case_mean"]["dice"]), _f(v["pooled"]["iou"]),
                 _f(v["per_case_mean"]["iou"]), _f(fe["pooled"]["sensitivity"]), _f(fe["pooled"]["specificity"]),
                 _f(fe["pooled"]["accuracy"]), _f(v["pooled"]["sensitivity"]), _f(v["pooled"]["specificity"], 4),
                 _f(v["pooled"]["accuracy"], 4), _f(lw["sensitivity"]), _f(lw["precision"]), _f(lw["f1"]),
                 _f(r.get("femur_dice_mean")), _params(r.get("params"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _params(p: dict | None) -> str:
    if not p:
        return ""
    scope = {"slice": "Otsu/slice", "volume": "Otsu/volume", "none": "no Otsu"}.get(p.get("otsu_scope"), "")
    return (f"floor {p['floor']:.3g}, {scope}, open {p['opening_mm']:g}, close {p['closing_mm']:g}, "
            f"min {p['min_area_mm2']:g} mm²")


def resolution_markdown(docs: list[dict]) -> str:
    """The resolution study: our pooled Dice and lesion F1 per inpainting size, one column
    pair per models folder, the paper's Dice first."""
    sets = []
    for d in docs:
        for ms in d.get("model_sets", []):
            if ms["label"] not in [s for s, _ in sets]:
                sets.append((ms["label"], d))
    head = ["size", "paper Dice"]
    for label, _ in sets:
        head += [f"Dice [{label}]", f"lesion F1 [{label}]"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    sizes = sorted({r["resolution"] for d in docs for r in d["rows"] if r["method"] == "ours"})
    for size in sizes:
        p = paper_row("ours", size)
        cells = [str(size), _f(p and p["dice"], 2)]
        for label, d in sets:
            r = next((r for r in d["rows"] if r["method"] == "ours" and r["models"] == label
                      and r["resolution"] == size), None)
            cells += ([_f(r["summary"]["volume"]["pooled"]["dice"]), _f(r["summary"]["lesion_wise"]["f1"])]
                      if r else ["", ""])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def size_groups_markdown(doc: dict) -> str:
    """Figure 3 as numbers: mean Dice per group of cases ranked by true lesion volume."""
    rows = [r for r in _sorted_rows(doc) if r["status"] == "ok" and r["summary"].get("size_groups")]
    if not rows:
        return ""
    groups = rows[0]["summary"]["size_groups"]
    head = ["lesion volume (mm³)", "cases"] + [f"{_label(r, len(doc['model_sets']) > 1)} {r.get('resolution') or ''}".strip()
                                              for r in rows]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    for i, g in enumerate(groups):
        cells = [f"{g['volume_mm3_min']:.0f}–{g['volume_mm3_max']:.0f}", str(g["n_cases"])]
        cells += [f"{_f(r['summary']['size_groups'][i]['dice_mean'], 2)} / {_f(r['summary']['size_groups'][i]['iou_mean'], 2)}"
                  for r in rows]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(doc: dict) -> list[str]:
    """Does our method at its largest size beat baselines (a) and (b) on pooled Dice? Facts only."""
    out = []
    for ms in doc.get("model_sets", []):
        ours = [r for r in doc["rows"] if r["method"] == "ours" and r["models"] == ms["label"] and r["status"] == "ok"]
        if not ours:
            continue
        top = max(ours, key=lambda r: r["resolution"])
        d = top["summary"]["volume"]["pooled"]["dice"]
        for name in ("intensity", "autoencoder"):
            cands = [r for r in doc["rows"] if r["method"] == name]
            b = next((r for r in cands if r.get("models") == ms["label"] and r["status"] == "ok"),
                     next((r for r in cands if r["status"] == "ok"), cands[0] if cands else None))
            if b is None or b["status"] != "ok":
                out.append(f"ours [{ms['label']}] at {top['resolution']}: {TITLES[name]} not run")
                continue
            bd = b["summary"]["volume"]["pooled"]["dice"]
            word = "beats" if (d or 0) > (bd or 0) else "does NOT beat"
            out.append(f"ours [{ms['label']}] at {top['resolution']} (pooled Dice {_f(d)}) {word} "
                       f"{TITLES[name]} ({_f(bd)})")
    return out


def report_markdown(docs: list[dict], short: bool = False, figure: dict | None = None) -> str:
    """Markdown for one or more documents, grouped by data set and split."""
    groups: dict[tuple, list[dict]] = {}
    for d in docs:
        groups.setdefault((d["data"]["path"], d["data"]["split"]), []).append(d)
    parts = []
    for key, ds in groups.items():
        doc = merge(ds) if len(ds) > 1 else ds[0]
        parts.append(f"**{caption(doc)}.**\n")
        borrowed = sorted({(r["models"], r["femur_from"]) for r in doc["rows"]
                           if r.get("femur_from") and r.get("models") and r["femur_from"] != r["models"]})
        if borrowed:
            parts.append("Same femur for every row: " + "; ".join(f"[{a}] scores the femur of [{b}]'s segmenter"
                                                                 for a, b in borrowed) + ".\n")
        parts.append("Table 1 (ours beside the paper's). Dice and IoU pooled over the whole volume; "
                     "Sens/Spec/Acc pooled over the true femur; lesion-wise F1 over 3D components.\n")
        parts.append(table1_markdown(doc) + "\n")
        if not short:
            parts.append("Every score (pooled unless marked; \"volume\": every voxel of the scan; "
                         "\"femur\": voxels in the true femur; parameters chosen on the validation split):\n")
            parts.append(detail_markdown(doc) + "\n")
        if len(doc.get("model_sets", [])) > 1 or not short:
            parts.append("Resolution study (pooled Dice and lesion-wise F1 of ours per inpainting size):\n")
            parts.append(resolution_markdown([doc]) + "\n")
        if not short:
            sg = size_groups_markdown(doc)
            if sg:
                parts.append("Figure 3 as numbers (mean Dice / IoU per group of cases ranked by true lesion "
                             "volume):\n")
                parts.append(sg + "\n")
        if figure and key in figure:
            parts.append(f"![Figure 3: Dice and IoU by lesion size]({figure[key]})\n")
        v = verdict(doc)
        if v:
            parts.append("Against the baselines: " + "; ".join(v) + ".\n")
        parts.append(f"Command: `{doc['command']}`" + (" (and others, merged)" if len(ds) > 1 else "") + "\n")
    parts.append(f"_{PAPER_NOTE}._\n")
    return "\n".join(parts)


def merge(docs: list[dict]) -> dict:
    """One document from several runs on the same data and split (e.g. two models
    folders evaluated apart): rows side by side, a row key kept once."""
    base = dict(docs[0])
    keys = {r["key"] for r in base["rows"]}
    rows, sets = list(base["rows"]), list(base.get("model_sets", []))
    for d in docs[1:]:
        if (d["data"]["path"], d["data"]["split"]) != (base["data"]["path"], base["data"]["split"]):
            raise BmlError("cannot merge runs on different data or splits")
        for r in d["rows"]:
            if r["key"] not in keys:
                rows.append(r)
                keys.add(r["key"])
        sets += [ms for ms in d.get("model_sets", []) if ms["label"] not in [s["label"] for s in sets]]
    base.update(rows=rows, model_sets=sets, command=" ; ".join(d["command"] for d in docs))
    return base


def write_outputs(doc: dict, out_dir: Path) -> dict[str, Path]:
    """evaluation.json, table1.csv, table1.md, cases.csv and figure3.png into `out_dir`."""
    from bmltrt.evaluation.figure import size_figure

    out_dir = Path(out_dir)
    paths = {}

    def text(name, content):
        paths[name] = atomic_write(out_dir / name, lambda tmp: Path(tmp).write_text(content))

    text("evaluation.json", json.dumps(doc, indent=1) + "\n")
    text("table1.csv", csv_text(doc))
    cases = cases_csv_text(doc)
    if cases:
        text("cases.csv", cases)
    png = size_figure([doc], out_dir / "figure3.png")
    if png:
        paths["figure3.png"] = png
    key = (doc["data"]["path"], doc["data"]["split"])
    text("table1.md", report_markdown([doc], figure={key: "figure3.png"} if png else None))
    return paths


def read_documents(paths: list[Path]) -> list[dict]:
    docs = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            p = p / "evaluation.json"
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise BmlError(f"cannot read an evaluation ({type(exc).__name__})", p,
                           "give evaluation.json files (or their folders) written by `bmltrt evaluate`") from None
        if not isinstance(d, dict) or d.get("format") != "bmltrt-evaluation-2":
            raise BmlError("not an evaluation written by this version of `bmltrt evaluate`", p)
        try:  # everything the tables read: a damaged or hand-edited file fails here, in one line
            if not (isinstance(d.get("rows"), list) and isinstance(d.get("model_sets"), list)
                    and isinstance(d["data"]["path"], str) and isinstance(d["data"]["split"], str)):
                raise TypeError("rows, model_sets or data")
            report_markdown([d]), csv_text(d)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
            raise BmlError(f"the evaluation is damaged or hand-edited ({type(exc).__name__}: {exc})", p,
                           "make it again with `bmltrt evaluate`") from None
        docs.append(d)
    return docs


def check_readme(readme: Path) -> None:
    from bmltrt.io.atomic import check_marked_block

    check_marked_block(readme, README_BEGIN, README_END, "results")


def paste_readme(readme: Path, block: str) -> None:
    """Replace the text between the README's result markers by `block`."""
    replace_marked_block(readme, README_BEGIN, README_END, f"\n{block.strip()}\n\n", "results")


def print_table(doc: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    several = len(doc.get("model_sets", [])) > 1
    t = Table(title=escape(caption(doc)))
    for c in ("method", "size", "Dice", "IoU", "Sens·F", "Spec·F", "Acc·F", "Dice mean", "les. F1", "paper Dice"):
        t.add_column(c)
    for r in _sorted_rows(doc):
        p = paper_row(r["method"], r.get("resolution"))
        if r["status"] != "ok":
            t.add_row(escape(_label(r, several)), str(r.get("resolution") or ""), escape(r.get("note", "")), "", "", "", "", "", "",
                      _f(p and p["dice"], 2))
            continue
        s = r["summary"]
        t.add_row(escape(_label(r, several)), str(r.get("resolution") or "native"), _f(s["volume"]["pooled"]["dice"]),
                  _f(s["volume"]["pooled"]["iou"]), _f(s["femur"]["pooled"]["sensitivity"]),
                  _f(s["femur"]["pooled"]["specificity"]), _f(s["femur"]["pooled"]["accuracy"]),
                  _f(s["volume"]["per_case_mean"]["dice"]), _f(s["lesion_wise"]["f1"]), _f(p and p["dice"], 2))
    console.print(t)
    console.print("Dice/IoU pooled over the whole volume; Sens/Spec/Acc (·F) pooled over the true femur; "
                  + PAPER_NOTE, markup=False)
    for line in verdict(doc):
        console.print(line, markup=False)
