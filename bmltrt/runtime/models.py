"""Where the models are, and what they are: the manifest written by `bmltrt export`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bmltrt.errors import BmlError

MANIFEST = "manifest.json"

# (path, size, mtime) -> sha256 of files already hashed: a file is hashed once per process,
# not once per scan, and hashed again if it changes.
_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify_model_file(path: Path, expected_sha256: str | None, name: str) -> None:
    """Refuse (one line) a model file whose sha256 differs from the manifest's."""
    import hashlib

    if not expected_sha256:
        raise BmlError(f"the manifest gives no sha256 for {name!r}", path, "re-export the models with `bmltrt export`")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _VERIFIED.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = _VERIFIED[key] = h.hexdigest()
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


@dataclass
class ModelStore:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: Path | None = None) -> "ModelStore":
        root = Path(root) if root else Path(os.environ["BMLTRT_MODELS"]) if os.environ.get("BMLTRT_MODELS") \
            else default_models_dir()
        man = root / MANIFEST
        if not man.exists():
            raise BmlError("no manifest.json in the models folder", root, "pass the folder `bmltrt export` wrote")
        try:
            manifest = json.loads(man.read_text())
        except json.JSONDecodeError as exc:
            raise BmlError(f"manifest.json is not valid JSON ({exc.msg})", man) from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("models", {}), dict):
            raise BmlError("manifest.json is not a bmltrt models manifest", man, "pass the folder `bmltrt export` wrote")
        return cls(root, manifest)

    def entry(self, name: str) -> dict:
        models = self.manifest.get("models", {})
        if name not in models:
            have = ", ".join(sorted(models)) or "none"
            raise BmlError(f"model {name!r} is not in the models folder (it has: {have})", self.root,
                           "export it with `bmltrt export`, or choose another --resolution")
        return models[name]

    def path(self, name: str) -> Path:
        """The model file, verified against the manifest's sha256 (once per file and process)."""
        e = self.entry(name)
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
