"""Run any bmltrt command with DetectConfig fields changed, for measurements of settings that
have no CLI option (every Detector the command makes gets them):

    python scripts/with_detect_config.py seg_antialias=1.0 lesion_rescue_percentile=0 -- \
        evaluate tune runs/oai_painted2 --resolutions 256 --models a=export --no-baselines -o OUT

The femur settings are part of the evaluation cache's key (evaluation.maps.femur_cleanup_of),
so runs with different settings can share one --cache folder.
"""

from __future__ import annotations

import dataclasses
import sys


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__)
        return 2
    cut = argv.index("--")
    import bmltrt.pipeline as pipeline
    from bmltrt.cli import main as cli

    defaults = pipeline.DetectConfig()
    over = {}
    for item in argv[:cut]:
        key, _, value = item.partition("=")
        if not hasattr(defaults, key) or not value:
            print(f"{item!r}: give FIELD=VALUE with a DetectConfig field", file=sys.stderr)
            return 2
        kind = type(getattr(defaults, key))
        over[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
    init = pipeline.Detector.__init__

    def patched(self, backend, config=None, *a, **k):
        init(self, backend, config, *a, **k)
        self.config = dataclasses.replace(self.config, **over)

    pipeline.Detector.__init__ = patched
    sys.argv = ["bmltrt", *argv[cut + 1:]]
    return cli()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
