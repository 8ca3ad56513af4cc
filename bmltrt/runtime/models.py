"""Where the models are, and what they are: the manifest written by `bmltrt export`.

Format ``bmltrt-models-2``: each network entry keeps its float32 graph's fields at the top
(``file``, ``sha256``: older readers keep working) and lists every precision under
``precisions`` (``{"fp32": {...}, "fp16": {...}}``, each with its file, sha256, signature and
checks; FP16 adds its float32 islands). Format 1 (float32 only) is read as before.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bmltrt.errors import BmlError
from bmltrt.io.checksum import file_sha256

MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16")
RESOLUTIONS = (128, 192, 256, 320, 448)  # the paper's inpainting sizes, the shipped models'


def parse_resolutions(text: str | None, option: str = "--resolutions", all_is="all") -> list[int] | str | None:
    """A comma-separated list of slice sizes, checked: None when not given, `all_is` for the
    word all (any case; each command says what it means), else distinct multiples of 8 (the
    generator halves a slice three times)."""
    if text is None:
        return None
    words = text.replace(" ", "").split(",")
    example = "e.g. " + option + " " + ",".join(map(str, RESOLUTIONS)) + " (or all)"
    if [w.lower() for w in words] == ["all"]:
        return all_is
    if not any(words):
        raise BmlError(f"{option} is empty", hint=example)
    if not all(words):  # "128,,256" or "128,": a size left out, not one to skip silently
        raise BmlError(f"{option} {text!r} has an empty item", hint=example)
    try:
        res = [int(w) for w in words]
    except ValueError:
        raise BmlError(f"{option} {text!r} is not a number, a comma-separated list of numbers or 'all'", hint=example) from None
    if len(set(res)) != len(res):
        raise BmlError(f"{option} {text!r} names a resolution twice", hint=example)
    check_resolutions(res, option, example)
    return res


def check_resolutions(res, option: str = "--resolutions", hint: str | None = None) -> None:
    bad = [r for r in res if r < 32 or r > 2048 or r % 8]
    if bad:
        raise BmlError(f"{option}: {bad[0]} is not a multiple of 8 between 32 and 2048", hint=hint)
FORMAT = "bmltrt-models-2"  # what export writes
FORMATS_READ = ("bmltrt-models-1", FORMAT)

# (path, size, mtime) -> sha256 of files already hashed: a file is hashed once per process,
# not once per scan, and hashed again if it changes.
_VERIFIED: dict[tuple[str, int, int], str] = {}


def select_resolutions(store, resolutions: list[int] | str | None) -> list[int]:
    """The asked inpainter resolutions (None or "all": all the models folder has), checked."""
    have = store.resolutions()
    res = sorted(set(resolutions)) if resolutions and resolutions != "all" else have
    bad = [r for r in res if r not in have]
    if bad:
        raise BmlError(f"no inpainter for resolution {', '.join(map(str, bad))} in the models folder", store.root,
                       f"choose among {have}")
    return res


def verify_model_file(path: Path, expected_sha256: str | None, name: str) -> None:
    """Refuse (one line) a model file whose sha256 differs from the manifest's."""
    if not expected_sha256:
        raise BmlError(f"the manifest gives no sha256 for {name!r}", path, "re-export the models with `bmltrt export`")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _VERIFIED.get(key)
    if digest is None:
        digest = _VERIFIED[key] = file_sha256(path)
    if digest != expected_sha256.lower():
        raise BmlError(f"model file of {name!r} does not match the sha256 in manifest.json (corrupt or swapped: "
                       f"{digest[:12]}... instead of {expected_sha256[:12]}...)", path,
                       "reinstall bmltrt, or re-export the models with `bmltrt export`")


def default_models_dir() -> Path:
    """Installed wheel: bmltrt/default_models; source checkout: <repo>/export."""
    pkg = Path(__file__).resolve().parents[1]
    for cand in (pkg / "default_models", pkg.parent / "export"):
        if (cand / MANIFEST).exists():
            return cand
    raise BmlError("the default models are missing (no manifest.json in bmltrt/default_models or export/)",
                   pkg, "reinstall bmltrt, or pass --models DIR")


def _whole(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _io_damage(io) -> str | None:
    """What is wrong with an entry's `io` (the graph's tensors as exported); None if nothing."""
    from bmltrt.runtime.specs import DTYPES

    if not isinstance(io, dict):
        return "io is not a JSON object"
    for side in ("inputs", "outputs"):
        tensors = io.get(side)  # lists as read from JSON; tuples in a manifest export is still making
        if not isinstance(tensors, (list, tuple)) or not tensors:
            return f"io.{side} is not a list of tensors"
        for t in tensors:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
                return f"io.{side}: a tensor without a name"
            shape = t.get("shape")
            if not isinstance(shape, (list, tuple)) or not all(isinstance(d, (int, str)) and not isinstance(d, bool)
                                                      for d in shape):
                return f"io.{side} {t['name']!r}: shape {shape!r} is not a list of sizes"
            if str(t.get("dtype", "float32")).lower() not in DTYPES:
                return f"io.{side} {t['name']!r}: unknown dtype {t.get('dtype')!r}"
    return None


def _entry_damage(name: str, e: dict) -> str | None:
    """What is wrong with one model entry, in the fields the runtime reads; None if nothing."""
    kind = e.get("kind")
    if kind not in ("segmenter", "inpainter"):
        return f"{name}: kind {kind!r} is not segmenter or inpainter"
    if kind == "inpainter" and not _whole(e.get("resolution"), 8, 8192):
        return f"{name}: resolution {e.get('resolution')!r} is not a whole number of pixels"
    if not isinstance(e.get("config", {}), dict):
        return f"{name}: config is not a JSON object"
    variants = e.get("precisions")
    if variants is None:
        variants = {e.get("precision", "fp32"): e}
    if not isinstance(variants, dict) or not variants:
        return f"{name}: precisions is not a JSON object of graphs"
    for p, v in variants.items():
        if p not in PRECISIONS:
            return f"{name}: unknown precision {p!r}"
        if not isinstance(v, dict) or not isinstance(v.get("file"), str) or not v["file"]:
            return f"{name} {p}: no file name"
        if not isinstance(v.get("sha256", ""), str):
            return f"{name} {p}: sha256 is not a string"
        io = {**e, **v}.get("io")
        damage = _io_damage(io) if io is not None else None
        if damage:
            return f"{name} {p}: {damage}"
    return None


def segmenter_config_damage(entry: dict) -> str | None:
    """What is wrong with the segmenter's config (what detect reads to cut and place its
    patches); None if nothing. Checked when a Detector is made."""
    cfg = entry.get("config", {})
    patch, grid, overlap = cfg.get("patch"), cfg.get("inplane_spacing_mm"), cfg.get("overlap")
    if not (isinstance(patch, (list, tuple)) and len(patch) == 3 and all(_whole(p, 1, 4096) for p in patch)):
        return f"segmenter: config.patch {patch!r} is not three whole numbers"
    if isinstance(grid, bool) or not isinstance(grid, (int, float)) or not 0.2 <= grid <= 10:
        return f"segmenter: config.inplane_spacing_mm {grid!r} is not a pixel size of 0.2-10 mm"
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        return f"segmenter: config.overlap {overlap!r} is not a fraction below 1"
    io = entry.get("io")
    if io is not None:  # the patch the runtime cuts must be the graph's input
        shape = io["inputs"][0]["shape"]
        if len(shape) != 5 or any(isinstance(d, int) and d != q for d, q in zip(shape[2:], patch)):
            return f"segmenter: config.patch {list(patch)} is not the graph's input {list(shape)}"
    return None


def damaged_manifest(damage: str, path: Path) -> BmlError:
    """The line for a manifest whose fields are wrong (manifest_damage, segmenter_config_damage)."""
    return BmlError(f"manifest.json is damaged: {damage}", path,
                    "export the models again with `bmltrt export`, or reinstall them")


def manifest_damage(manifest: dict) -> str | None:
    """What is wrong with a manifest in the fields the runtime reads (a hand edit, a bad copy),
    said before any scan instead of as a crash in the middle of one; None if nothing."""
    if manifest.get("format", FORMAT) not in FORMATS_READ:
        return f"format {manifest.get('format')!r} is not {FORMAT} (made by another version of bmltrt?)"
    default = manifest.get("default_resolution", 256)
    if not _whole(default, 8, 8192):
        return f"default_resolution {default!r} is not a whole number of pixels"
    seen = {}
    for name, e in manifest.get("models", {}).items():
        damage = _entry_damage(str(name), e)
        if damage:
            return damage
        if e["kind"] == "inpainter":
            if e["resolution"] in seen:
                return f"{seen[e['resolution']]} and {name} both claim resolution {e['resolution']}"
            seen[e["resolution"]] = name
    return None


@dataclass
class ModelStore:
    root: Path
    manifest: dict
    precision: str = "fp32"  # what entry() and path() give when not told otherwise

    @classmethod
    def open(cls, root: Path | None = None, precision: str = "fp32") -> "ModelStore":
        if precision not in PRECISIONS:
            raise BmlError(f"unknown precision {precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}")
        from_env = not root and bool(os.environ.get("BMLTRT_MODELS"))
        root = Path(root) if root else Path(os.environ["BMLTRT_MODELS"]) if from_env else default_models_dir()
        given = "$BMLTRT_MODELS" if from_env else "--models"  # where the path came from: what to fix
        whence = " (from $BMLTRT_MODELS)" if from_env else ""
        man = root / MANIFEST
        if root.exists() and not root.is_dir():
            raise BmlError(f"the models path is a file, not a folder{whence}", root,
                           f"pass the folder `bmltrt export` wrote ({given}), the one holding manifest.json")
        if not root.is_dir():
            raise BmlError(f"models folder not found{whence}", root, f"pass the folder `bmltrt export` wrote ({given})")
        if not man.exists():
            raise BmlError("no manifest.json in the models folder", root, "pass the folder `bmltrt export` wrote")
        try:
            manifest = json.loads(man.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise BmlError(f"manifest.json is not valid JSON ({type(exc).__name__})", man,
                           "export the models again with `bmltrt export`") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("models", {}), dict) \
                or not all(isinstance(e, dict) for e in manifest.get("models", {}).values()):
            raise BmlError("manifest.json is not a bmltrt models manifest", man, "pass the folder `bmltrt export` wrote")
        damage = manifest_damage(manifest)
        if damage:
            raise damaged_manifest(damage, man)
        return cls(root, manifest, precision)

    def _raw(self, name: str) -> dict:
        models = self.manifest.get("models", {})
        if name not in models:
            have = ", ".join(sorted(models)) or "none"
            raise BmlError(f"model {name!r} is not in the models folder (it has: {have})", self.root,
                           "export it with `bmltrt export`, or choose another --resolution")
        return models[name]

    def precisions(self, name: str) -> list[str]:
        e = self._raw(name)
        return sorted(e["precisions"]) if "precisions" in e else [e.get("precision", "fp32")]

    def entry(self, name: str, precision: str | None = None) -> dict:
        """The network's manifest entry as seen at one precision: common fields (config,
        resolution, training record) with that precision's file, sha256, signature, islands."""
        precision = precision or self.precision
        e = self._raw(name)
        variants = e.get("precisions") or {e.get("precision", "fp32"): e}
        if precision not in variants:
            raise BmlError(f"the models folder has no {precision} graph of {name!r} (it has: "
                           f"{', '.join(sorted(variants))})", self.root,
                           f"make it with `bmltrt export --precision {precision}` (or both)")
        common = {k: v for k, v in e.items() if k != "precisions"}
        return {**common, **variants[precision], "precision": precision}

    def path(self, name: str, precision: str | None = None) -> Path:
        """The model file, verified against the manifest's sha256 (once per file and process)."""
        e = self.entry(name, precision)
        p = self.root / e["file"]
        if not p.is_file():
            raise BmlError(f"model file of {name!r} is missing", p, "re-export or reinstall the models")
        verify_model_file(p, e.get("sha256"), name)
        return p

    def resolutions(self) -> list[int]:
        return sorted(int(e["resolution"]) for e in self.manifest.get("models", {}).values()
                      if e.get("kind") == "inpainter")

    @property
    def default_resolution(self) -> int:
        return int(self.manifest.get("default_resolution", 256))
