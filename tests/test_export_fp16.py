"""Export: both precisions, float32 islands, graph checks, determinism (toy-size networks)."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import REPO, needs_torch

SHIPPED = REPO / "export"


def _toy_checkpoints(root):
    """Tiny random-initialised segmenter and generator saved like training checkpoints."""
    import torch

    from bmltrt.models.lama import InpainterConfig, LamaGenerator
    from bmltrt.models.unetpp import SegmenterConfig, build_segmenter

    torch.manual_seed(0)
    seg_cfg = SegmenterConfig(features=(4, 4, 8, 16, 32, 4), patch=(16, 32, 32), inplane_spacing_mm=3.2)
    seg = build_segmenter(seg_cfg)
    inp_cfg = InpainterConfig(ngf=8, n_blocks=1)
    gen = LamaGenerator(inp_cfg)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in gen.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    seg_p, inp_p = root / "seg.pt", root / "inp.pt"
    torch.save({"config": {"segmenter": seg_cfg.to_dict()}, "modules": {"net": seg.state_dict()}, "step": 0}, seg_p)
    torch.save({"config": {"inpainter": inp_cfg.to_dict(), "resolution": 64}, "modules": {"gen": gen.state_dict()},
                "step": 0}, inp_p)
    return seg_p, inp_p


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory):
    if not __import__("conftest").has_torch():
        pytest.skip("torch not installed")
    from bmltrt.export.build import make_models

    root = tmp_path_factory.mktemp("toy")
    seg, inp = _toy_checkpoints(root)
    man = make_models(root / "a", segmenter=seg, inpainters=[inp], resolutions=[64, 96], precision="both",
                      default_resolution=64, calibration_cases=1, progress=lambda s: None)
    return root, seg, inp, man


@needs_torch
def test_one_command_makes_both_precisions_of_every_network(toy_models):
    root, _, _, man = toy_models
    assert man["format"] == "bmltrt-models-2"
    assert sorted(man["models"]) == ["inpainter_64", "inpainter_96", "segmenter"]
    for name, e in man["models"].items():
        assert sorted(e["precisions"]) == ["fp16", "fp32"]
        f16 = e["precisions"]["fp16"]
        assert f16["file"] == f"{name}_fp16.onnx" and e["file"] == f"{name}.onnx"
        assert f16["islands"]["counts"].get("norm", 0) > 0
        assert f16["activation_ranges"]["max_abs"] > 0  # calibrated on a phantom
        for v in e["precisions"].values():
            c = v["checks"]
            assert c["onnx_checker_full"] == c["strict_shape_inference"] == "passed"
            assert c["tensorrt_10_3_ops"] == c["signature"] == "passed"
            assert c["polygraphy_lint"]["status"] in ("passed", "unavailable")
            assert man["files"][v["file"]] == v["sha256"]
    assert man["calibration"]["cases"] == 1 and len(man["calibration"]["sha256"]) == 64
    assert {"onnx", "onnxruntime", "torch"} <= set(man["tools"])
    assert man["models"]["inpainter_96"]["precisions"]["fp16"]["io"] == {
        "inputs": [{"name": "masked_and_mask", "dtype": "float32", "shape": ["batch", 2, 96, 96]}],
        "outputs": [{"name": "generated", "dtype": "float32", "shape": ["batch", 1, 96, 96]}]}
    on_disk = json.loads((root / "a" / "manifest.json").read_text())
    assert on_disk["files"] == man["files"]


@needs_torch
def test_export_is_byte_identical(toy_models, tmp_path):
    from bmltrt.export.build import make_models

    root, seg, inp, man = toy_models
    again = make_models(tmp_path / "b", segmenter=seg, inpainters=[inp], resolutions=[64, 96], precision="both",
                        default_resolution=64, calibration_cases=1, lint=False, progress=lambda s: None)
    assert again["files"] == man["files"]
    for f in man["files"]:
        assert (tmp_path / "b" / f).read_bytes() == (root / "a" / f).read_bytes(), f


@needs_torch
def test_fp16_islands_keep_dft_constants_exact_and_norms_float32(toy_models):
    from bmltrt.models.dft import dft_matrices

    root, *_ = toy_models
    m = onnx.load(str(root / "a" / "inpainter_64_fp16.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    exact = {k: v.astype(np.float32) for k, v in dft_matrices(8, 8).items()}  # the FourierUnit runs at 64/8
    seen = 0
    for n in m.graph.node:
        consts = [inits[i] for i in n.input if i in inits]
        if n.op_type == "MatMul" and consts:
            (c,) = consts
            assert c.data_type == TensorProto.FLOAT
            arr = numpy_helper.to_array(c)
            assert any(arr.shape == v.shape and np.array_equal(arr, v) for v in exact.values())
            seen += 1
        if n.op_type in ("BatchNormalization", "InstanceNormalization"):
            src = producers.get(n.input[0])
            assert src is None or src.op_type != "Cast" or src.attribute[0].i == TensorProto.FLOAT
            assert all(inits[i].data_type == TensorProto.FLOAT for i in n.input[1:])
        if n.op_type == "Conv" and "/fu/" not in n.name:
            assert inits[n.input[1]].data_type == TensorProto.FLOAT16  # weights stored FP16
    assert seen == 24  # 2 FourierUnits (1 block x 2 FFC layers) x (6 rfft + 6 irfft products)
    seg = onnx.load(str(root / "a" / "segmenter_fp16.onnx"))
    assert {i.type.tensor_type.elem_type for i in list(seg.graph.input) + list(seg.graph.output)} == {TensorProto.FLOAT}


@needs_torch
def test_fp16_graph_runs_honestly_close_to_float32(toy_models):
    import torch

    from bmltrt.runtime.onnx_torch import OnnxGraphModule

    root, *_ = toy_models
    x = np.random.default_rng(0).random((3, 2, 64, 64), np.float32)
    x[:, 1] = 0
    x[:, 1, 20:40, 16:48] = 1
    x[:, 0] *= 1 - x[:, 1]
    seen = set()
    m16 = OnnxGraphModule(root / "a" / "inpainter_64_fp16.onnx")
    with torch.no_grad():
        y16 = m16.run((torch.from_numpy(x),), hook=lambda nm, op, ins, outs, res: seen.update(r.dtype for r in res))
        y32 = OnnxGraphModule(root / "a" / "inpainter_64.onnx")(torch.from_numpy(x))
    assert torch.float16 in seen and torch.float32 in seen
    assert torch.isfinite(y16).all()
    assert 0 < float((y16 - y32).abs().max()) < 2e-2


@needs_torch
def test_calibrated_range_above_the_bound_makes_an_island():
    from bmltrt.export.fp16 import to_fp16

    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["a"], name="c1"), helper.make_node("Relu", ["a"], ["y"], name="r")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 4, 4])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    half, rec = to_fp16(model, ranges={"x": 1.0, "a": 2e4, "y": 2e4}, bound=1e4)
    assert rec["nodes"] == {"c1": "range", "r": "range"} and rec["fp16_nodes"] == 0
    half, rec = to_fp16(model, ranges={"x": 1.0, "a": 50.0, "y": 50.0}, bound=1e4)
    assert rec["nodes"] == {} and rec["fp16_nodes"] == 2
    onnx.checker.check_model(half, full_check=True)
    assert [n.op_type for n in half.graph.node] == ["Cast", "Conv", "Relu", "Cast"]


def test_tensorrt_op_check_rejects_dft_custom_ops_and_tensor_pad_axes():
    from bmltrt.export.checks import op_problems

    def model(nodes, inits=()):
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    assert any("DFT" in p for p in op_problems(model([helper.make_node("DFT", ["x"], ["y"], name="f")])))
    assert any("custom" in p for p in op_problems(model([helper.make_node("Foo", ["x"], ["y"], domain="my.ops")])))
    pads = numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64), "p")
    assert any("axes" in p for p in op_problems(model([helper.make_node("Pad", ["x", "p", "", "ax"], ["y"])], [pads])))
    assert op_problems(model([helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect")], [pads])) == []


def test_shipped_graphs_pass_the_checks_and_their_fp16_pass():
    """The shipped float32 graphs (and the FP16 graphs made from them) pass onnx.checker, strict
    shape inference and the TensorRT 10.3 op list; every listed file matches its sha256."""
    from bmltrt.export.checks import op_problems, signature, signature_problems
    from bmltrt.export.fp16 import to_fp16
    from bmltrt.export.graph import clean, strict_check
    from bmltrt.io.checksum import file_sha256
    from bmltrt.runtime.models import ModelStore

    store = ModelStore.open(SHIPPED)
    for name in sorted(store.manifest["models"]):
        for prec in store.precisions(name):
            e = store.entry(name, prec)
            assert file_sha256(store.path(name, prec)) == e["sha256"], (name, prec)
            m = onnx.load(str(store.path(name, prec)))
            assert op_problems(m) == [], (name, prec)
    for name in ("segmenter", "inpainter_128"):
        e = store.entry(name)
        m = onnx.load(str(store.path(name)))
        dims = e["config"]["patch"] if name == "segmenter" else [e["resolution"]] * 2
        ins, outs = ([1, *dims], [2, *dims]) if name == "segmenter" else ([2, *dims], [1, *dims])
        c = clean(m, {m.graph.input[0].name: ins}, {m.graph.output[0].name: outs}, name)
        half, _ = to_fp16(c)
        for g in (c, half):
            strict_check(g, name)
            assert op_problems(g) == [] and signature_problems(signature(g)) == []


def test_store_reads_both_manifest_formats(tmp_path):
    from bmltrt.errors import BmlError
    from bmltrt.runtime.models import ModelStore

    import hashlib

    (tmp_path / "a.onnx").write_bytes(b"x")
    (tmp_path / "a_fp16.onnx").write_bytes(b"y")
    # the store checks every file against its sha256, so the manifest carries the real ones
    h32, h16 = hashlib.sha256(b"x").hexdigest(), hashlib.sha256(b"y").hexdigest()
    old = {"format": "bmltrt-models-1", "models": {"segmenter": {"file": "a.onnx", "sha256": h32, "kind": "segmenter",
                                                                "precision": "fp32", "config": {}}}}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    s = ModelStore.open(tmp_path)
    assert s.path("segmenter") == tmp_path / "a.onnx" and s.precisions("segmenter") == ["fp32"]
    with pytest.raises(BmlError, match="no fp16 graph"):
        s.path("segmenter", precision="fp16")
    new = {"format": "bmltrt-models-2", "models": {"segmenter": {
        "file": "a.onnx", "sha256": h32, "kind": "segmenter", "config": {"patch": [1]},
        "precisions": {"fp32": {"file": "a.onnx", "sha256": h32}, "fp16": {"file": "a_fp16.onnx", "sha256": h16}}}}}
    (tmp_path / "manifest.json").write_text(json.dumps(new))
    s = ModelStore.open(tmp_path)
    assert s.path("segmenter", precision="fp16") == tmp_path / "a_fp16.onnx"
    e = ModelStore.open(tmp_path, "fp16").entry("segmenter")
    assert e["sha256"] == h16 and e["config"] == {"patch": [1]} and e["precision"] == "fp16"


def test_checkpoint_resolutions_single_and_multi():
    from bmltrt.export.onnx_export import checkpoint_resolutions

    assert checkpoint_resolutions({"config": {"resolution": 256}}) == [256]
    assert checkpoint_resolutions({"config": {"resolution": None, "resolutions": [128, 448]}}) == [128, 448]
    assert checkpoint_resolutions({"config": {}}) == []


# ---- a models folder is never replaced unasked, nor left a mix (hostile tester 7) ----------

def _fp32(out, quiet=True, **kw):
    from bmltrt.export.build import make_models

    kw.setdefault("default_resolution", 64)
    return make_models(out, precision="fp32", calibration_cases=0, lint=False, progress=lambda s: None, **kw)


@needs_torch
def test_export_replaces_an_earlier_export_only_with_overwrite_and_leaves_no_mix(toy_models, tmp_path):
    from bmltrt.errors import BmlError

    root, seg, inp, _ = toy_models
    out = tmp_path / "m"
    _fp32(out, segmenter=seg, inpainters=[inp], resolutions=[64, 96])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(BmlError, match="already holds an export"):
        _fp32(out, segmenter=seg, inpainters=[inp], resolutions=[64])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    (out / "notes.txt").write_text("mine")
    man = _fp32(out, segmenter=seg, inpainters=[inp], resolutions=[64], overwrite=True)
    assert sorted(man["models"]) == ["inpainter_64", "segmenter"]
    # the graph this export did not make is gone (a manifest beside stale graphs is a mix);
    # a file of the user's is not ours to remove
    assert sorted(p.name for p in out.iterdir()) == ["inpainter_64.onnx", "manifest.json", "notes.txt",
                                                     "segmenter.onnx"]
    # the post-processing tuned for the earlier export stays while its networks do ...
    from bmltrt.postprocess.tuned import POSTPROCESS_FILE, tuned_document, write_tuned

    write_tuned(out, tuned_document(man, {64: {"floor": 0.4}}, {"split": "val"}))
    warned = []
    _fp32(out, segmenter=seg, inpainters=[inp], resolutions=[64], overwrite=True, warn=warned.append)
    assert (out / POSTPROCESS_FILE).is_file() and warned == []
    # ... and goes, said, when a network it was tuned with is replaced (never a mix)
    _fp32(out, segmenter=_changed_segmenter(seg, tmp_path), inpainters=[inp], resolutions=[64], overwrite=True,
          warn=warned.append)
    assert not (out / POSTPROCESS_FILE).exists() and "tuned with another segmenter: removed" in warned[0], warned


def _changed_segmenter(seg, where):
    import torch

    ck = torch.load(seg, weights_only=False)
    for v in ck["modules"]["net"].values():
        v.add_(0.01) if v.is_floating_point() else None
    ck["kind"] = "segmenter"
    torch.save(ck, where / "seg2.pt")
    return where / "seg2.pt"


@needs_torch
def test_export_checks_resolutions_before_any_graph_is_made(toy_models, tmp_path):
    from bmltrt.errors import BmlError

    root, seg, inp, _ = toy_models
    for kw, said in (({"from_onnx": root / "a", "resolutions": [128]}, "no inpainter_128 in the --from-onnx folder"),
                     ({"inpainters": [inp], "resolutions": [64], "default_resolution": 96},
                      "--default-resolution 96 is not among"),
                     ({"inpainters": [inp, inp], "resolutions": [64]}, "goes with one --inpainter")):
        with pytest.raises(BmlError, match=said):
            _fp32(tmp_path / "x", **{"default_resolution": None, **kw})
        assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


@needs_torch
def test_export_from_onnx_brings_the_tuned_postprocessing_and_says_when_to_tune_again(toy_models, tmp_path):
    from bmltrt.postprocess.tuned import POSTPROCESS_FILE, read_tuned, tuned_document, write_tuned

    root, seg, inp, man = toy_models
    src = tmp_path / "src"
    _fp32(src, from_onnx=root / "a")
    src_man = json.loads((src / "manifest.json").read_text())
    write_tuned(src, tuned_document(src_man, {64: {"floor": 0.4, "opening_mm": 0.8}}, {"split": "val"}))
    warned = []
    _fp32(tmp_path / "same", from_onnx=src, warn=warned.append)
    assert (tmp_path / "same" / POSTPROCESS_FILE).read_bytes() == (src / POSTPROCESS_FILE).read_bytes()
    assert warned == []  # the same graphs: its settings hold as they are
    same_man = json.loads((tmp_path / "same" / "manifest.json").read_text())
    cfg, _, warnings = read_tuned(tmp_path / "same", same_man, 64)
    assert cfg.floor == 0.4 and warnings == []
    # a new segmenter with the folder's inpainters: the settings come along, with a warning
    _fp32(tmp_path / "new", from_onnx=src, segmenter=_changed_segmenter(seg, tmp_path), warn=warned.append)
    assert len(warned) == 1 and "tuned with its segmenter" in warned[0], warned
    new_man = json.loads((tmp_path / "new" / "manifest.json").read_text())
    assert "tuned with another segmenter" in read_tuned(tmp_path / "new", new_man, 64)[2][0]
