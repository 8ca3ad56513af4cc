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


def detect_config_overrides(items) -> dict:
    """FIELD=VALUE strings -> {field: value}, each typed like DetectConfig's default for it.
    ValueError (one line) for a field DetectConfig does not have or a value of the wrong type."""
    from bmltrt.pipeline import DetectConfig

    defaults = DetectConfig()
    over = {}
    for item in items:
        key, _, value = item.partition("=")
        if not hasattr(defaults, key) or not value:
            raise ValueError(f"{item!r}: give FIELD=VALUE with a DetectConfig field")
        kind = type(getattr(defaults, key))
        try:
            kind = float if kind is type(None) else kind  # a None default (by resolution) takes a number
            over[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"{item!r}: {key} takes a {kind.__name__}") from None
    return over


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__)
        return 2
    cut = argv.index("--")
    import bmltrt.pipeline as pipeline
    from bmltrt.cli import main as cli

    try:
        over = detect_config_overrides(argv[:cut])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init = pipeline.Detector.__init__

    def patched(self, backend, config=None, *a, **k):
        init(self, backend, config, *a, **k)
        self.config = dataclasses.replace(self.config, **over)

    pipeline.Detector.__init__ = patched
    sys.argv = ["bmltrt", *argv[cut + 1:]]
    return cli()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
