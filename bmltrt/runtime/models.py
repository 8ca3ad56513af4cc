"""Where the models are, and what they are: the manifest written by `bmltrt export`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bmltrt.errors import BmlError

MANIFEST = "manifest.json"


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
        return cls(root, manifest)

    def entry(self, name: str) -> dict:
        models = self.manifest.get("models", {})
        if name not in models:
            have = ", ".join(sorted(models)) or "none"
            raise BmlError(f"model {name!r} is not in the models folder (it has: {have})", self.root,
                           "export it with `bmltrt export`, or choose another --resolution")
        return models[name]

    def path(self, name: str) -> Path:
        p = self.root / self.entry(name)["file"]
        if not p.exists():
            raise BmlError(f"model file of {name!r} is missing", p, "re-export or reinstall the models")
        return p

    def resolutions(self) -> list[int]:
        return sorted(int(e["resolution"]) for e in self.manifest.get("models", {}).values()
                      if e.get("kind") == "inpainter")

    @property
    def default_resolution(self) -> int:
        return int(self.manifest.get("default_resolution", 256))
