"""One command, one complete models folder: float32 and FP16 graphs of the segmenter and
of the inpainter at every resolution, checked, with a manifest that says what each file is.

    make_models(out, segmenter=CKPT, inpainters=[CKPT], resolutions=[128, 192, 256, 320, 448],
                precision="both")
    make_models(out, from_onnx="export/", precision="both")   # float32 graphs already made

Files: ``segmenter.onnx``, ``inpainter_<res>.onnx`` (float32) and ``*_fp16.onnx``. The same
checkpoints give byte-identical ONNX files (the manifest also records tool versions).
"""

from __future__ import annotations

import json
import math
import platform
import re
import shutil
from pathlib import Path

import onnx

from bmltrt.errors import BmlError, stop_if_terminated
from bmltrt.io.atomic import atomic_write
from bmltrt.io.outputs import folder_beside, move_in
from bmltrt.postprocess.tuned import POSTPROCESS_FILE
from bmltrt.runtime.models import FORMAT, check_resolutions

MANIFEST = "manifest.json"
_KEEP_FIELDS = ("kind", "config", "resolution", "trained_resolutions", "fft", "trained", "max_abs_err_vs_torch")


def _file_name(name: str, precision: str) -> str:
    return f"{name}.onnx" if precision == "fp32" else f"{name}_{precision}.onnx"


def _save(model: onnx.ModelProto, path: Path) -> None:
    data = model.SerializeToString(deterministic=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), suffix=".onnx")


def _variant(path: Path, model: onnx.ModelProto, lint: bool) -> dict:
    from bmltrt.export.checks import check_graph, signature
    from bmltrt.io.checksum import file_sha256

    checks = check_graph(path, lint=lint)
    return {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size,
            "ops": sorted({n.op_type for n in model.graph.node}), "opset": model.opset_import[0].version,
            "io": signature(model), "checks": checks}


def tool_versions() -> dict:
    from bmltrt import __version__
    from bmltrt.optional import optional_import

    out = {"bmltrt": __version__, "python": platform.python_version()}
    for mod in ("onnx", "onnxruntime", "torch", "numpy", "monai", "polygraphy"):
        m, _ = optional_import(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def _fp32_graphs(segmenter, inpainters, resolutions, from_onnx, progress) -> dict[str, tuple]:
    """name -> (clean float32 ModelProto, manifest fields)."""
    graphs = {}
    if from_onnx is not None:
        from bmltrt.export.graph import clean
        from bmltrt.runtime.models import ModelStore

        src = ModelStore.open(from_onnx, "fp32")
        names = sorted(src.manifest.get("models", {}))
        for name in names:
            e = src.entry(name, "fp32")
            if e.get("kind") == "inpainter" and resolutions and int(e["resolution"]) not in resolutions:
                continue
            progress(f"clean {name} (from {src.path(name).name})")
            model = onnx.load(str(src.path(name)))
            if e["kind"] == "segmenter":
                patch = list(e["config"]["patch"])
                ins, outs = {"image": [1, *patch]}, {"logits": [2, *patch]}
            else:
                r = int(e["resolution"])
                ins, outs = {"masked_and_mask": [2, r, r]}, {"generated": [1, r, r]}
            # the names the graph really has (older exports used the same, but read them)
            ins = dict(zip([i.name for i in model.graph.input], ins.values()))
            outs = dict(zip([o.name for o in model.graph.output], outs.values()))
            fields = {k: e[k] for k in _KEEP_FIELDS if k in e}
            fields["source"] = {"onnx": str(src.path(name)), "sha256": e.get("sha256")}
            graphs[name] = (clean(model, ins, outs, src.path(name)), fields)
        if segmenter is None and not inpainters:
            return graphs
        # checkpoints given as well replace the folder's graphs of the same name (a retrained
        # segmenter shipped with the folder's inpainters)

    from bmltrt.export.onnx_export import checkpoint_resolutions, inpainter_graph, segmenter_graph
    from bmltrt.io.checksum import file_sha256
    from bmltrt.training.checkpoint import load

    if segmenter is not None:
        progress("export segmenter")
        model, fields = segmenter_graph(load(segmenter), segmenter)
        fields["source"] = {"checkpoint": Path(segmenter).name, "sha256": file_sha256(Path(segmenter))}
        graphs["segmenter"] = (model, fields)
    inpainters = list(inpainters)
    from_checkpoints: set[str] = set()
    for ck in inpainters:
        ckpt = load(ck)
        for res in (resolutions or checkpoint_resolutions(ckpt) or [None]):
            progress(f"export inpainter {res}")
            model, fields = inpainter_graph(ckpt, res, ck)
            name = f"inpainter_{fields['resolution']}"
            if name in from_checkpoints:
                raise BmlError(f"two inpainter checkpoints give resolution {fields['resolution']}", ck)
            from_checkpoints.add(name)
            fields["source"] = {"checkpoint": Path(ck).name, "sha256": file_sha256(Path(ck))}
            graphs[name] = (model, fields)
    return graphs


GRAPH_NAME = re.compile(r"(segmenter|inpainter_\d+)(_fp16)?\.onnx")  # what export writes besides the manifest


def earlier_models(out_dir: Path) -> list[str]:
    """The names in `out_dir` that an earlier export wrote (its manifest and graphs) or that
    belong to it (the post-processing tuned for it)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p.name for p in out_dir.iterdir()
                  if p.name in (MANIFEST, POSTPROCESS_FILE) or GRAPH_NAME.fullmatch(p.name))


def planned_resolutions(inpainters, resolutions, from_onnx) -> list[int]:
    """The inpainter resolutions an export will write, checked before any graph is made:
    --resolutions against the --from-onnx folder (when no checkpoint makes them), else the
    checkpoints' own sizes."""
    from bmltrt.runtime.models import ModelStore

    have = set(ModelStore.open(from_onnx).resolutions()) if from_onnx is not None else set()
    if inpainters:
        from bmltrt.export.onnx_export import checkpoint_resolutions
        from bmltrt.training.checkpoint import load

        if resolutions and len(inpainters) > 1:
            raise BmlError("--resolutions goes with one --inpainter checkpoint (one per resolution otherwise)")
        if resolutions:  # the one checkpoint at these sizes; the folder's other inpainters are left out
            return sorted(resolutions)
        made = set()
        for ck in inpainters:
            sizes = checkpoint_resolutions(load(ck))
            if not sizes:
                raise BmlError("the inpainter checkpoint names no resolution it was trained at", ck,
                               "give --resolutions (e.g. 256)")
            made |= set(sizes)
        return sorted(have | made)
    if resolutions:
        missing = sorted(set(resolutions) - have)
        if missing:
            raise BmlError(f"--resolutions: no inpainter_{missing[0]} in the --from-onnx folder "
                           f"(it has {', '.join(map(str, sorted(have))) or 'none'})", from_onnx,
                           "choose among those, or give an --inpainter checkpoint to export at other sizes")
        return sorted(resolutions)
    return sorted(have)


def make_models(out_dir, segmenter=None, inpainters=(), resolutions=None, from_onnx=None,
                precision: str = "both", default_resolution: int | None = None, calibration_cases: int = 2,
                calibration_seed: int = 11, bound: float | None = None, fp16_io: bool = False,
                lint: bool = True, progress=print, overwrite: bool = False, warn=None) -> dict:
    """Write the models folder (graphs + manifest.json) and return the manifest. A folder
    that holds an earlier export is replaced only with `overwrite` (its graphs that this
    export does not make are removed: one export per folder, never a mix). --from-onnx's
    postprocess.json comes along (read_tuned warns if the networks it names changed)."""
    from bmltrt.export.fp16 import DEFAULT_BOUND

    if precision not in ("fp32", "fp16", "both"):
        raise BmlError(f"unknown --precision {precision!r}", hint="choose fp32, fp16 or both")
    bound = DEFAULT_BOUND if bound is None else float(bound)
    out_dir = Path(out_dir)
    if from_onnx is not None and Path(from_onnx).resolve() == out_dir.resolve():
        raise BmlError("--from-onnx and --out are the same folder", out_dir, "write the new models elsewhere")
    if from_onnx is None and segmenter is None and not inpainters:
        raise BmlError("nothing to export", hint="pass --segmenter/--inpainter checkpoints or --from-onnx DIR")
    if calibration_cases < 0:
        raise BmlError(f"--calibration-cases {calibration_cases} is negative", hint="give 0 (islands by rule only) or more")
    if not (math.isfinite(bound) and bound > 0):
        raise BmlError(f"--fp16-bound {bound} is not a positive number", hint=f"the default is {DEFAULT_BOUND:g}")
    resolutions = [int(r) for r in resolutions] if resolutions else None
    if resolutions:
        check_resolutions(resolutions)
    earlier = earlier_models(out_dir)
    if earlier and not overwrite:
        raise BmlError(f"the models folder already holds an export ({', '.join(earlier[:3])}"
                       f"{', ...' if len(earlier) > 3 else ''})", out_dir,
                       "add --overwrite to replace it, or choose another --out")
    have = planned_resolutions(list(inpainters), resolutions, from_onnx)  # before minutes of work
    if default_resolution is not None and have and int(default_resolution) not in have:
        raise BmlError(f"--default-resolution {default_resolution} is not among the exported inpainters' "
                       f"({', '.join(map(str, have))})", hint="choose one of them, or leave it out")
    if not have and warn is not None:
        warn("this models folder gets no inpainter: detect cannot use it alone "
             "(add --from-onnx export/ to ship the segmenter with the default inpainters)")
    said = progress

    def progress(message):  # between steps: a SIGTERM whose exception was lost stops here
        stop_if_terminated()
        said(message)

    # Everything is written beside --out and moved in at the end, the manifest last: an
    # interrupted or failed export leaves the old folder as it was (no new graphs beside an
    # old manifest).
    with folder_beside(out_dir, "export") as stage:
        manifest = _write_models(stage, graphs=_fp32_graphs(segmenter, inpainters, resolutions, from_onnx, progress),
                                 precision=precision, default_resolution=default_resolution,
                                 calibration_cases=calibration_cases, calibration_seed=calibration_seed, bound=bound,
                                 fp16_io=fp16_io, lint=lint, progress=progress)
        _carry_tuning(stage, manifest, from_onnx, out_dir if POSTPROCESS_FILE in earlier else None,
                      warn or (lambda line: None))
        stale = [n for n in earlier if not (stage / n).exists()]  # what this export does not make
        move_in(stage, out_dir, last=MANIFEST, drop_first=stale)
    return manifest


def _carry_tuning(stage: Path, manifest: dict, from_onnx, earlier_dir, warn) -> None:
    """The post-processing that goes with the new graphs: --from-onnx's postprocess.json (with
    a warning where a network it was tuned with changed), else the earlier export's in the
    folder, kept only while every network it was tuned with is unchanged."""
    source = Path(from_onnx) / POSTPROCESS_FILE if from_onnx is not None else None
    if source is not None and source.is_file():
        shutil.copyfile(source, stage / POSTPROCESS_FILE)
        changed = _retuning_needed(source, manifest)
        if changed:
            warn(f"{POSTPROCESS_FILE} comes from {from_onnx}, tuned with its {' and '.join(changed)}: run "
                 "`bmltrt evaluate tune DATA --save --models OUT` for the new one (detect warns until then)")
        return
    kept = Path(earlier_dir) / POSTPROCESS_FILE if earlier_dir is not None else None
    if kept is None or not kept.is_file():
        return
    changed = _retuning_needed(kept, manifest)
    if changed:  # not carried: move_in removes it with the earlier export's other files
        warn(f"the earlier {POSTPROCESS_FILE} was tuned with another {' and '.join(changed)}: removed "
             "(detect uses the built-in settings until `bmltrt evaluate tune DATA --save --models OUT`)")
    else:
        shutil.copyfile(kept, stage / POSTPROCESS_FILE)


def _retuning_needed(tuned_path: Path, manifest: dict) -> list[str]:
    """The networks a postprocess.json names whose graphs this export changed."""
    from bmltrt.postprocess.tuned import network_shas

    try:
        named = json.loads(tuned_path.read_text()).get("models", {})
    except (OSError, ValueError, AttributeError):
        return []  # a damaged file: detect names it
    changed = []
    for name, sha in named.items():
        now = network_shas(manifest, name)
        if isinstance(sha, str) and now and sha not in now:
            changed.append(name)
    return changed


def _write_models(out_dir: Path, graphs: dict, precision: str, default_resolution: int | None, calibration_cases: int,
                  calibration_seed: int, bound: float, fp16_io: bool, lint: bool, progress) -> dict:
    """The graphs of every precision, checked, and manifest.json, into `out_dir`."""
    from bmltrt.export.calibrate import activation_ranges, calibration_inputs, fp16_tensors, range_summary
    from bmltrt.export.fp16 import to_fp16
    from bmltrt.runtime.models import ModelStore

    models = {}
    for name, (model, fields) in sorted(graphs.items()):
        path = out_dir / _file_name(name, "fp32")
        _save(model, path)
        progress(f"check {path.name}")
        v = _variant(path, model, lint)
        models[name] = {**fields, **v, "precision": "fp32", "precisions": {"fp32": v}}
    have = sorted(int(e["resolution"]) for e in models.values() if e["kind"] == "inpainter")
    wanted = 256 if default_resolution is None else int(default_resolution)
    manifest = {"format": FORMAT, "default_resolution": min(have, key=lambda r: abs(r - wanted)) if have else wanted,
                "models": models, "tools": tool_versions()}

    if precision in ("fp16", "both"):
        store = ModelStore(out_dir, manifest, "fp32")
        can_calibrate = "segmenter" in models and have
        calib, crecord = (None, None)
        if can_calibrate and calibration_cases > 0:
            progress(f"calibrate on {calibration_cases} phantom knees (float32 pipeline)")
            calib, crecord = calibration_inputs(store, calibration_cases, calibration_seed, have)
        manifest["calibration"] = crecord or {"source": "none (no segmenter+inpainter pair, or 0 cases): "
                                                        "islands by rule only"}
        for name, (model, _) in sorted(graphs.items()):
            ranges = None
            if calib is not None and name in calib:
                progress(f"activation ranges of {name}")
                ranges = activation_ranges(model, calib[name])
            half, islands = to_fp16(model, ranges["tensors"] if ranges else None, bound, keep_io_types=not fp16_io)
            path = out_dir / _file_name(name, "fp16")
            _save(half, path)
            progress(f"check {path.name}")
            v = _variant(path, half, lint)
            v["islands"] = islands
            if ranges:
                v["activation_ranges"] = range_summary(ranges, fp16_tensors(model, islands["nodes"]))
            models[name]["precisions"]["fp16"] = v
        if precision == "fp16":  # keep the float32 graphs (calibration and parity need them) but say so
            manifest["note"] = "exported with --precision fp16; the float32 graphs are kept as the reference"
    manifest["files"] = {e["file"]: e["sha256"] for m in models.values() for e in m["precisions"].values()}
    atomic_write(out_dir / MANIFEST,
                 lambda p: Path(p).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n"))
    return manifest

