"""The post-processing chosen on a validation split, kept beside the models it was chosen for.

`bmltrt evaluate tune DATA --save` writes ``postprocess.json`` into the models folder;
`detect` (any `Detector` built without an explicit PostConfig) reads it, one setting per
inpainting resolution; explicit options (``--floor`` ...) override single fields. The
file names the sha256 of the networks it was tuned with: a file left behind by other
models is still used, with a warning in every report.

    {"format": "bmltrt-postprocess-1",
     "tuned": {"data": ..., "split": "val", "cases": 12, "objective": ..., "date": ..., "command": ...},
     "models": {"segmenter": "<sha256>", "inpainter_256": "<sha256>", ...},
     "by_resolution": {"256": {"floor": 0.5, "opening_mm": 1.2, "closing_mm": 1.2,
                               "min_area_mm2": 4.0, "otsu_scope": "slice", "val_dice": 0.79}, ...}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bmltrt.errors import BmlError
from bmltrt.io.atomic import atomic_write
from bmltrt.postprocess.lesion import PostConfig

POSTPROCESS_FILE = "postprocess.json"
RECORD_PREFIX = "val_"  # what the tuning scored (val_dice, ...): kept beside the settings, not a setting
FORMAT = "bmltrt-postprocess-1"


def network_shas(manifest: dict, name: str) -> set[str]:
    """Every sha256 a network has in a manifest (one per precision, if several)."""
    e = manifest.get("models", {}).get(name, {})
    out = {e["sha256"]} if "sha256" in e else set()
    out |= {v["sha256"] for v in e.get("precisions", {}).values() if "sha256" in v}
    return out


def read_tuned(root: Path, manifest: dict, resolution: int) -> tuple[PostConfig | None, str, list[str]]:
    """(config, where it came from, warnings) for one resolution; (None, ...) without a file
    or without an entry for that resolution."""
    path = Path(root) / POSTPROCESS_FILE
    if not os.path.lexists(path):  # a broken link is a damaged file, not an absent one
        return None, "built-in defaults", []
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        if doc.get("format", FORMAT) != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        if not isinstance(doc.get("tuned", {}), dict) or not isinstance(doc.get("models", {}), dict) \
                or not all(isinstance(v, str) for v in doc.get("models", {}).values()):
            raise TypeError("'tuned' or 'models' is not what tune --save writes")
        entry = doc["by_resolution"].get(str(resolution))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, AttributeError, TypeError,
            ValueError) as exc:
        why = type(exc).__name__ + (f": {str(exc)[:80]}" if type(exc) in (TypeError, ValueError) else "")
        raise BmlError(f"{POSTPROCESS_FILE} is not a bmltrt post-processing file ({why})", path,
                       "delete it, or write it again with `bmltrt evaluate tune ... --save`") from None
    if entry is None:
        return None, f"built-in defaults ({POSTPROCESS_FILE} has no entry for resolution {resolution})", []
    try:
        if not isinstance(entry, dict):
            raise TypeError("not a JSON object")
        # a misspelt setting ("flor") would otherwise be dropped and its default used, silently
        fields = PostConfig.__dataclass_fields__
        unknown = sorted(k for k in entry if k not in fields and not str(k).startswith(RECORD_PREFIX))
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))} is not a post-processing setting (they are: "
                             f"{', '.join(fields)}; {RECORD_PREFIX}* keys are records)")
        cfg = PostConfig.from_dict(entry)
        if cfg.floor > 1:  # detect's difference map is in HE units: nothing passes a floor above 1
            raise ValueError(f"floor {cfg.floor!r} is not a number from 0 to 1")
    except (TypeError, ValueError, AttributeError) as exc:
        raise BmlError(f"{POSTPROCESS_FILE}: bad entry for resolution {resolution} ({exc})", path,
                       "correct it, or write it again with `bmltrt evaluate tune DATA --save`") from None
    tuned = doc.get("tuned", {})
    source = f"{path} (tuned on {tuned.get('split', '?')} of {tuned.get('data', '?')})"
    warnings = []
    for name in ("segmenter", f"inpainter_{resolution}"):
        want = doc.get("models", {}).get(name)
        if want and network_shas(manifest, name) and want not in network_shas(manifest, name):
            warnings.append(f"{POSTPROCESS_FILE} was tuned with another {name} (sha256 {want[:12]}): "
                            "run `bmltrt evaluate tune DATA --save` again for these models")
    return cfg, source, warnings


def tuned_document(manifest: dict, by_resolution: dict[int, dict], tuned: dict) -> dict:
    names = ["segmenter"] + [f"inpainter_{r}" for r in sorted(by_resolution)]
    shas = {n: manifest["models"][n]["sha256"] for n in names if "sha256" in manifest.get("models", {}).get(n, {})}
    return {"format": FORMAT, "tuned": tuned, "models": shas,
            "by_resolution": {str(r): by_resolution[r] for r in sorted(by_resolution)}}


def write_tuned(root: Path, doc: dict) -> Path:
    """Write (or merge into) the models folder's postprocess.json: resolutions not in
    `doc` keep their earlier entries."""
    path = Path(root) / POSTPROCESS_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
            merged = dict(old.get("by_resolution", {}), **doc["by_resolution"])
            doc = dict(doc, by_resolution=dict(sorted(merged.items(), key=lambda kv: int(kv[0]))),
                       models=dict(old.get("models", {}), **doc["models"]))
        except (json.JSONDecodeError, AttributeError):
            pass  # a broken file is replaced
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1) + "\n"))
    return path
