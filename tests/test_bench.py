"""`bmltrt bench`: runs end to end on toy models (no timing asserted), counts MACs right,
carries machine and commit on every figure, refuses bad options in one line."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from conftest import has_torch, needs_torch

runner = CliRunner()


@pytest.fixture(scope="module")
def toy_models_dir(tmp_path_factory):
    """Toy segmenter + generator (test_export_fp16's checkpoints), both precisions, one
    resolution, no calibration and no lint: seconds."""
    if not has_torch():
        pytest.skip("torch not installed (needed to make the toy models)")
    from test_export_fp16 import _toy_checkpoints

    from bmltrt.export.build import make_models

    root = tmp_path_factory.mktemp("benchmodels")
    seg, inp = _toy_checkpoints(root)
    make_models(root / "m", segmenter=seg, inpainters=[inp], resolutions=[64], precision="both",
                default_resolution=64, calibration_cases=0, lint=False, progress=lambda s: None)
    return root / "m"


@pytest.fixture(scope="module")
def quick_run(toy_models_dir, tmp_path_factory):
    from bmltrt.cli import app

    out = tmp_path_factory.mktemp("bench") / "res"
    res = runner.invoke(app, ["bench", "--quick", "--models", str(toy_models_dir), "-o", str(out), "--threads", "1"])
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "bench.json").read_text())


@needs_torch
def test_quick_bench_writes_json_csv_png(quick_run):
    out, res = quick_run
    assert res["format"] == "bmltrt-bench-1"
    assert res["settings"]["mirror_tta"] is True  # the stage timings are of detect's default pipeline
    sections = {r["section"] for r in res["rows"]}
    for s in ("macs", "inpainter", "segmenter", "stages", "ratio", "scaling", "memory_check", "roofline"):
        assert s in sections, s
    # every figure carries the machine, the commit and the date
    m = res["machine"]
    for key in ("cpu", "cores", "date", "commit", "libraries"):
        assert m.get(key) not in (None, "", {}), key
    for r in res["rows"]:
        assert r["machine"] == res["machine_label"] and r["commit"] == m["commit"] and r["date"] == m["date"]
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(res["rows"])
    assert all(r["machine"] and r["commit"] and r["date"] for r in rows)
    for png in ("throughput.png", "stages.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_torch
def test_quick_bench_compares_side_by_side(quick_run):
    _, res = quick_run
    rows = res["rows"]
    backends = {r["backend"] for r in rows if r["section"] == "inpainter"}
    assert {"onnxruntime", "torch", "torch-eager/torch", "torch-eager/matmul"} <= backends
    assert {r["precision"] for r in rows if r["section"] == "inpainter" and r["backend"] == "onnxruntime"} == \
        {"fp32", "fp16"}
    # ORT CPU fp16 is reported as not computing in fp16
    f16 = [r for r in rows if r["section"] == "inpainter" and r["backend"] == "onnxruntime" and r["precision"] == "fp16"]
    assert all("casting to float32" in r["note"] for r in f16)
    stages = {r["stage"] for r in rows if r["section"] == "stages" and r["backend"] == "onnxruntime"}
    assert stages == {"load", "normalise", "segment", "clean_up", "inpaint", "postprocess", "write", "total"}
    for r in rows:
        if r["section"] == "stages" and r["stage"] == "total":
            parts = [x["median"] for x in rows if x["section"] == "stages" and x["backend"] == r["backend"]
                     and x["precision"] == r["precision"] and x["stage"] not in ("total",)]
            assert len(parts) == 7 and all(p >= 0 for p in parts)
    ratio = {(r["what"], r["stage"]) for r in rows if r["section"] == "ratio"}
    assert ("eager fp32 / ours, per stage", "total") in ratio
    assert any(w.startswith("FFT path") for w, _ in ratio)
    assert any("fp16 / fp32" in w for w, _ in ratio)
    # throughput figures: min <= median <= max, positive
    for r in rows:
        if r["section"] in ("inpainter", "segmenter"):
            assert 0 < r["min"] <= r["median"] <= r["max"]
    mem = [r for r in rows if r["section"] == "memory_check"]
    assert mem and mem[0]["median"] > 0 and mem[0]["fits"] is True
    scal = {(r["what"], r["batch"]) for r in rows if r["section"] == "scaling"}
    assert ("slices per scan", 4) in scal and ("scans per run", 2) in scal
    # the MACs of the inpainter rows equal those counted from the file
    from bmltrt.bench.macs import count_macs

    macs = {r["what"]: r["median"] for r in rows if r["section"] == "macs"}
    assert macs["inpainter_64"] == count_macs(res["models_dir"] + "/inpainter_64.onnx")["total"]


@needs_torch
def test_readme_section_is_generated_between_markers(quick_run, tmp_path):
    from bmltrt.bench.readme import BEGIN, END, main

    out, res = quick_run
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{BEGIN}\nold numbers\n{END}\n\nafter\n")
    assert main([str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("# x\n\nbefore") and text.rstrip().endswith("after")
    block = text.split(BEGIN)[1].split(END)[0]
    assert res["machine"]["commit"] in block and "PyTorch eager float32 vs ours" in block
    assert "| onnxruntime cpu fp32 |" in block
    # a second run replaces the block, it does not add one
    assert main([str(out), "--readme", str(readme)]) == 0
    assert readme.read_text().count(BEGIN) == 1
    # no markers: one line, exit 2
    bare = tmp_path / "BARE.md"
    bare.write_text("# nothing\n")
    assert main([str(out), "--readme", str(bare)]) == 2


def _conv_model(n, cin, cout, hw, k, group=1, dynamic_batch=True):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N" if dynamic_batch else n, cin, hw, hw])
    w = numpy_helper.from_array(np.zeros((cout, cin // group, k, k), np.float32), "w")
    b = numpy_helper.from_array(np.zeros((cin * hw, 5), np.float32), "b")  # for the MatMul
    conv = helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[k, k], pads=[k // 2] * 4, strides=[2, 2],
                            group=group)
    # (N, cout, hw/2, hw/2) -> reshape (N, cout*hw/2, hw/2) ... keep it simple: a MatMul on x
    shape = numpy_helper.from_array(np.array([0, cin * hw, hw], np.int64), "shape")
    resh = helper.make_node("Reshape", ["x", "shape"], ["r"])
    tr = helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1])  # (N, hw, cin*hw)
    mm = helper.make_node("MatMul", ["t", "b"], ["m"])  # (N, hw, 5): hw*5*cin*hw MACs
    yc = helper.make_tensor_value_info("c", TensorProto.FLOAT, None)
    ym = helper.make_tensor_value_info("m", TensorProto.FLOAT, None)
    g = helper.make_graph([conv, resh, tr, mm], "g", [x], [yc, ym], [w, b, shape])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_mac_count_of_a_known_graph_equals_hand_computation():
    from bmltrt.bench.macs import count_macs

    # Conv 3x3, stride 2, pad 1, 8 -> 16 channels on 32x32: output 16 x 16 x 16,
    # each output element 8 * 3 * 3 MACs; MatMul (32, 8*32) x (8*32, 5).
    m = count_macs(_conv_model(1, 8, 16, 32, 3))
    conv = 16 * 16 * 16 * 8 * 3 * 3
    mm = 32 * 5 * 8 * 32
    assert m["by_op"] == {"Conv": conv, "MatMul": mm}
    assert m["total"] == conv + mm and not m["uncounted"]
    # grouped conv: Cin/group per output element; the batch is counted as 1
    g = count_macs(_conv_model(4, 8, 16, 32, 3, group=4, dynamic_batch=False))
    assert g["by_op"]["Conv"] == 4 * 16 * 16 * 16 * 2 * 3 * 3


def test_shipped_inpainter_macs_grow_with_resolution_and_dft_share_is_stated():
    from conftest import REPO

    from bmltrt.bench.macs import count_macs
    from bmltrt.runtime.models import ModelStore

    store = ModelStore.open(REPO / "export")
    res = store.resolutions()[:2]
    counts = [count_macs(store.path(f"inpainter_{r}")) for r in res]
    for c in counts:
        assert not c["uncounted"] and c["by_op"].get("MatMul", 0) > 0 and 0 < c["matmul_share"] < 0.5
    if len(res) == 2:  # convolutions scale with the pixel count (the FourierUnit's 1x1 conv on W/2+1
        # spectrum columns a little less), the DFT matmuls faster (H*W*(H+W))
        conv = [c["by_op"]["Conv"] for c in counts]
        assert conv[1] / conv[0] == pytest.approx((res[1] / res[0]) ** 2, rel=0.01)
        mm = [c["by_op"]["MatMul"] for c in counts]
        assert mm[1] / mm[0] > (res[1] / res[0]) ** 2


@pytest.mark.parametrize("args", [
    ["--resolutions", "abc"], ["--resolutions", "100"], ["--backends", "cuda"], ["--precisions", "fp8"],
    ["--batch-sizes", "0"], ["--batch-sizes", "1,1"], ["--repeats", "0"], ["--threads", "0"],
    ["--models", "/nonexistent/models"], ["--resolutions", ""], ["--batch-sizes", "1,,2"], ["--resolutions", "256,"],
    ["--backends", "tensorrt"],  # asked for, cannot run here: not a bench of MAC counts alone
])
def test_bad_options_one_line_exit_2(args, tmp_path):
    import importlib.util

    from bmltrt.cli import app

    if "tensorrt" in args and importlib.util.find_spec("tensorrt"):
        pytest.skip("TensorRT is installed here")

    res = runner.invoke(app, ["bench", "--quick", "-o", str(tmp_path / "o"), *args])
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert not (tmp_path / "o").exists()


def test_results_folder_that_is_a_file_is_refused(tmp_path):
    from bmltrt.cli import app

    f = tmp_path / "file"
    f.write_text("x")
    res = runner.invoke(app, ["bench", "--quick", "-o", str(f)])
    assert res.exit_code == 2 and "is a file" in res.output


from test_runtime_without_torch import BLOCK  # noqa: E402  (the import blocker, one copy)


@needs_torch  # the toy models are made with torch; the bench itself then runs without it
def test_bench_runs_without_torch_and_says_so(toy_models_dir, tmp_path):
    code = BLOCK + (
        "from typer.testing import CliRunner\nfrom bmltrt.cli import app\nimport json\n"
        f"res = CliRunner().invoke(app, ['bench', '--quick', '--backends', 'onnxruntime,torch,eager', "
        f"'--precisions', 'fp32', '--models', {str(toy_models_dir)!r}, '-o', {str(tmp_path / 'r')!r}, "
        "'--threads', '1'])\n"
        "assert res.exit_code == 0, res.output\nassert 'torch' not in sys.modules\n"
        f"d = json.load(open({str(tmp_path / 'r' / 'bench.json')!r}))\n"
        "assert {r['backend'] for r in d['rows'] if r['section'] == 'inpainter'} == {'onnxruntime'}\n"
        "assert any('torch is not installed' in n for n in d['notes'])\nprint('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_more_threads_than_cores_is_said_in_the_notes(tmp_path):
    from bmltrt.bench.machine import usable_cores
    from bmltrt.bench.run import Bench, BenchOptions
    from bmltrt.optional import optional_import

    torch, _ = optional_import("torch")
    before = (torch.get_num_threads() if torch else None, os.environ.get("BMLTRT_THREADS"))
    over = Bench(BenchOptions(quick=True, threads=usable_cores() + 1), tmp_path)
    fits = Bench(BenchOptions(quick=True, threads=usable_cores()), tmp_path)
    assert (torch.get_num_threads() if torch else None, os.environ.get("BMLTRT_THREADS")) == before  # run() sets them
    assert over.threads == usable_cores() + 1
    assert any("oversubscription" in n for n in over.notes), over.notes
    assert not any("oversubscription" in n for n in fits.notes), fits.notes


# ---- what detect refuses, bench refuses before measuring (hostile tester 7) ------------------

def _copy_models(src, dst, edit_manifest=None, postprocess=None):
    import shutil

    shutil.copytree(src, dst)
    if edit_manifest is not None:
        man = json.loads((dst / "manifest.json").read_text())
        edit_manifest(man)
        (dst / "manifest.json").write_text(json.dumps(man))
    if postprocess is not None:
        (dst / "postprocess.json").write_text(json.dumps(postprocess))
    return dst


def _fp32_only(man):
    for e in man["models"].values():
        e["precisions"].pop("fp16", None)


def _bad_patch(man):
    man["models"]["segmenter"]["config"]["patch"] = [8, 8, 8]


@needs_torch
@pytest.mark.parametrize("edit,post,extra,said", [
    (_fp32_only, None, ["--precisions", "fp16"], "--precisions fp16: the models folder has no fp16 graph"),
    (None, {"by_resolution": {"64": {"floor": 5}}}, [], "floor 5 is not a number from 0 to 1"),
    (_bad_patch, None, [], "manifest.json is damaged: segmenter: config.patch [8, 8, 8]"),
], ids=["precision_missing", "postprocess_floor", "segmenter_patch"])
def test_bench_refuses_a_folder_detect_refuses_before_measuring(toy_models_dir, tmp_path, edit, post, extra, said):
    from bmltrt.cli import app

    models = _copy_models(toy_models_dir, tmp_path / "m", edit, post)
    res = runner.invoke(app, ["bench", "--quick", "--models", str(models), "-o", str(tmp_path / "o"), *extra])
    assert res.exit_code == 2 and said in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()


@needs_torch
def test_bench_overwrite_leaves_no_plot_of_the_earlier_run(toy_models_dir, tmp_path, monkeypatch):
    import bmltrt.bench.output as output
    from bmltrt.cli import app

    out = tmp_path / "o"
    out.mkdir()
    (out / "stages.png").write_bytes(b"an earlier run's plot")
    (out / "stages_backup.png").write_bytes(b"the user's")
    monkeypatch.setattr(output, "stages_plot", lambda res, path: None)  # as when a run has no stage rows
    res = runner.invoke(app, ["bench", "--quick", "--models", str(toy_models_dir), "-o", str(out), "--overwrite",
                              "--backends", "onnxruntime", "--precisions", "fp32", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["bench.csv", "bench.json", "stages_backup.png", "throughput.png"]
