"""Engine cache keys, stale-plan detection, profile derivation, and `bmltrt build-engines`
on a CPU: every error path without TensorRT, and the whole build flow against a stand-in
tensorrt module (tests/fake_tensorrt.py) that records what a real build would be asked."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fake_tensorrt
from bmltrt.cli import app
from bmltrt.errors import BmlError
from bmltrt.runtime import engines
from bmltrt.runtime.models import ModelStore
from bmltrt.runtime.specs import ModelSpec, TensorSpec, model_spec, optimization_profile, spec_from_entry
from bmltrt.runtime.trt_build import BuildOptions, network_flags, plan_jobs

H100 = engines.GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
ORIN = engines.GpuInfo("Orin", "8.7")
PROFILE = {"masked_and_mask": [(1, 2, 256, 256), (8, 2, 256, 256), (16, 2, 256, 256)]}


def _ident(**kw):
    base = dict(model="inpainter_256", precision="fp16", onnx_sha256="ab" * 32, tensorrt="10.8.0.43", gpu=H100,
                profile=PROFILE)
    base.update(kw)
    return engines.identity(**base)


# -- keys and sidecars ---------------------------------------------------------------

def test_engine_key_covers_every_identity_field():
    k = engines.engine_key(_ident())
    assert k == engines.engine_key(_ident())
    changed = [_ident(onnx_sha256="cd" * 32), _ident(tensorrt="10.3.0"), _ident(gpu=ORIN),
               _ident(gpu=engines.GpuInfo("NVIDIA H100 80GB HBM3", "9.1")), _ident(precision="fp32"),
               _ident(profile={"masked_and_mask": [(1, 2, 256, 256), (8, 2, 256, 256), (32, 2, 256, 256)]}),
               _ident(model="inpainter_448")]
    keys = {engines.engine_key(i) for i in changed}
    assert k not in keys and len(keys) == len(changed)
    name = engines.plan_path(Path("e"), _ident()).name
    assert name.startswith("inpainter_256_fp16_") and name.endswith(".plan")


def test_stale_plans_are_detected_with_one_clear_reason(tmp_path):
    plan = engines.write_plan(tmp_path, _ident(), b"PLAN-BYTES")
    assert engines.check_plan(plan, _ident()) == (True, "")
    meta = engines.read_sidecar(plan)
    assert meta["plan_sha256"] and meta["gpu"] == H100.name and meta["compute_capability"] == "9.0"
    ok, why = engines.check_plan(plan, _ident(tensorrt="10.9.0.1"))
    assert not ok and "TensorRT 10.8.0.43" in why and "this is TensorRT 10.9.0.1" in why
    ok, why = engines.check_plan(plan, _ident(gpu=ORIN))
    assert not ok and "on NVIDIA H100" in why and "compute capability 8.7" in why
    ok, why = engines.check_plan(plan, _ident(onnx_sha256="cd" * 32))
    assert not ok and "another ONNX file" in why
    ok, why = engines.check_plan(plan, _ident(profile={"masked_and_mask": [(1, 2, 256, 256)] * 3}))
    assert not ok and "batch 1..16" in why
    plan.write_bytes(b"PLAN-BYTES-truncated-or-replaced")
    ok, why = engines.check_plan(plan, _ident())
    assert not ok and "changed after it was built" in why
    engines.sidecar_path(plan).unlink()
    assert engines.check_plan(plan, _ident())[1].endswith("missing or unreadable")
    assert engines.check_plan(tmp_path / "nope.plan", _ident()) == (False, "not built")


def test_find_plan_takes_a_fitting_plan_and_refuses_another_gpus_in_one_line(tmp_path):
    small = {"masked_and_mask": [(1, 2, 256, 256), (4, 2, 256, 256), (4, 2, 256, 256)]}
    engines.write_plan(tmp_path, _ident(gpu=ORIN, tensorrt="10.3.0"), b"orin")
    with pytest.raises(BmlError) as err:
        engines.find_plan(tmp_path, "inpainter_256", "fp16", "ab" * 32, "10.8.0.43", H100)
    line = err.value.line()
    assert "\n" not in line and "built for TensorRT 10.3.0 on Orin" in line and "build-engines" in line
    p_small = engines.write_plan(tmp_path, _ident(profile=small), b"small")
    p_big = engines.write_plan(tmp_path, _ident(), b"big")
    plan, meta = engines.find_plan(tmp_path, "inpainter_256", "fp16", "ab" * 32, "10.8.0.43", H100)
    assert plan == p_big  # the largest profile wins
    plan, _ = engines.find_plan(tmp_path, "inpainter_256", "fp16", "ab" * 32, "10.8.0.43", H100, need_batch=2)
    assert plan in (p_small, p_big)
    with pytest.raises(BmlError, match="no TensorRT engine for segmenter"):
        engines.find_plan(tmp_path, "segmenter", "fp16", "ab" * 32, "10.8.0.43", H100)


# -- specs and profiles ---------------------------------------------------------------

def test_specs_come_from_the_manifest():
    store = ModelStore.open()
    seg = model_spec(store, "segmenter")
    assert seg.input.shape == (-1, 1, 16, 112, 112) and seg.output.shape == (-1, 2, 16, 112, 112)
    inp = model_spec(store, "inpainter_256")
    assert inp.input.shape == (-1, 2, 256, 256) and inp.output.shape == (-1, 1, 256, 256)
    assert inp.input.dtype == "float32" and inp.input.name and inp.output.name
    # a format-2 manifest entry lists the signature itself
    e = {"kind": "inpainter", "resolution": 64,
         "io": {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 2, 64, 64]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 1, 64, 64]}]}}
    s = spec_from_entry("inpainter_64", e)
    assert s.input == TensorSpec("x", "float32", (-1, 2, 64, 64)) and s.output.with_batch(3) == (3, 1, 64, 64)
    with pytest.raises(ValueError):
        s.check_batch(np.zeros((2, 2, 32, 32), np.float32))
    assert s.check_batch(np.zeros((5, 2, 64, 64), np.float32)) == 5


def test_profiles_are_derived_from_the_input_specs():
    store = ModelStore.open()
    prof = optimization_profile(model_spec(store, "segmenter"), max_batch=16, opt_batch=4)
    (name, (mn, opt, mx)), = prof.items()
    assert mn == (1, 1, 16, 112, 112) and opt == (4, 1, 16, 112, 112) and mx == (16, 1, 16, 112, 112)
    prof = optimization_profile(model_spec(store, "inpainter_448"), max_batch=4, opt_batch=8)
    assert list(prof.values())[0][1][0] == 4  # opt never above max
    bad = ModelSpec("m", (TensorSpec("x", "float32", (-1, 2, -1, 64)),), (TensorSpec("y", "float32", (-1, 1)),))
    with pytest.raises(BmlError, match="only the batch"):
        optimization_profile(bad, 8, 4)
    with pytest.raises(BmlError):
        optimization_profile(model_spec(store, "segmenter"), 0, 1)
    jobs = plan_jobs(store, [256, 448], BuildOptions(precisions=("fp32",), max_batch=8))
    assert [j.model for j in jobs] == ["segmenter", "inpainter_256", "inpainter_448"]
    assert all(list(j.profile.values())[0][2][0] == 8 for j in jobs)


def test_network_flags_strongly_typed_on_10_plain_on_11():
    assert network_flags(fake_tensorrt.make("10.3.0")) == 1 << 1
    assert network_flags(fake_tensorrt.make("11.1.0")) == 0


# -- build-engines without TensorRT: every error path ---------------------------------

def _cli(*args):
    return CliRunner().invoke(app, ["build-engines", *args])


def _one_line_error(res, *words):
    assert res.exit_code == 2, res.output + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as without TensorRT


def test_without_tensorrt_one_line_says_what_to_install(no_tensorrt, tmp_path):
    _one_line_error(_cli("--out", str(tmp_path)), "TensorRT is not installed", "tensorrt-cu12", "JetPack")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args,words", [
    (["--precision", "int8"], ["unknown precision"]),
    (["--max-batch", "0"], ["--max-batch 0"]),
    (["--workspace", "0"], ["--workspace 0"]),
    (["--opt-level", "9"], ["--opt-level 9", "0..5"]),
    (["--resolutions", "1000"], ["no inpainter for resolution 1000"]),
    (["--resolutions", "999"], ["multiple of 8"]),
    (["--resolutions", "2x6"], ["comma-separated"]),
    (["--models", "/nonexistent/models"], ["models folder not found"]),
])
def test_bad_options_fail_in_one_line_before_tensorrt_is_asked(no_tensorrt, args, words):
    _one_line_error(_cli(*args), *words)


def test_paths_and_graphs_are_checked_before_tensorrt_is_asked(no_tensorrt, tmp_path, monkeypatch):
    import shutil

    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(_cli("--out", str(afile)), "--out is a file, not a folder")
    _one_line_error(_cli("--out", str(afile / "sub")), "--out lies under a file")
    _one_line_error(_cli("--timing-cache", str(tmp_path)), "--timing-cache is a folder")
    _one_line_error(_cli("--timing-cache", str(tmp_path / "none" / "x.cache")), "--timing-cache's folder does not exist")
    monkeypatch.setenv("BMLTRT_ENGINES", str(afile))
    _one_line_error(_cli(), "$BMLTRT_ENGINES is a file")
    monkeypatch.delenv("BMLTRT_ENGINES")
    models = tmp_path / "m"
    shutil.copytree(ModelStore.open().root, models)
    man = json.loads((models / "manifest.json").read_text())
    for e in man["models"].values():  # a float32-only models folder
        e["precisions"].pop("fp16", None)
    (models / "manifest.json").write_text(json.dumps(man))
    _one_line_error(_cli("--models", str(models), "--out", str(tmp_path / "e")), "no fp16 graph of 'segmenter'")
    # only then TensorRT, with what to do here (there is no --backend on this command)
    res = _cli("--models", str(models), "--precision", "fp32", "--out", str(tmp_path / "e"))
    _one_line_error(res, "TensorRT is not installed")
    assert "--backend" not in res.stderr and not (tmp_path / "e").exists()


@pytest.mark.parametrize("word", ["all", "ALL", " All "])
def test_resolutions_all_means_every_size_of_the_models_folder(no_tensorrt, word):
    _one_line_error(_cli("--resolutions", word), "TensorRT is not installed")  # parsed, then TensorRT is asked


def test_too_old_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make("8.6.1"))
    _one_line_error(_cli(), "TensorRT 8.6.1 is too old", ">= 10.3")


def test_tensorrt_without_a_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make("10.8.0.43"))
    monkeypatch.setattr(engines, "cupy_with_gpu", lambda: (None, "CuPy found no CUDA device"))
    _one_line_error(_cli(), "no CUDA GPU", "cupy-cuda12x")


def test_fp16_without_fp16_graphs_says_how_to_make_them(monkeypatch, tmp_path):
    import shutil

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make())
    monkeypatch.setattr(engines, "current_gpu", lambda: H100)
    models = tmp_path / "m"
    shutil.copytree(ModelStore.open().root, models)
    man = json.loads((models / "manifest.json").read_text())
    for e in man["models"].values():  # a float32-only models folder
        e.pop("precisions", None)
        e["precision"] = "fp32"
    (models / "manifest.json").write_text(json.dumps(man))
    _one_line_error(_cli("--models", str(models), "--precision", "fp16"), "fp16", "bmltrt export --precision fp16")


# -- the build flow against a stand-in TensorRT ----------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(engines, "current_gpu", lambda: H100)


def _install(monkeypatch, **kw):
    trt = fake_tensorrt.make(**kw)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def test_build_flow_builds_skips_and_rebuilds(monkeypatch, fake_gpu, tmp_path):
    out = tmp_path / "engines"
    trt = _install(monkeypatch, version="10.8.0.43")
    args = ["--out", str(out), "--resolutions", "256", "--precision", "fp32", "--max-batch", "8",
            "--workspace", "2", "--opt-level", "4"]
    res = _cli(*args)
    assert res.exit_code == 0, res.output + res.stderr
    plans = sorted(out.glob("*.plan"))
    assert [p.name.split("_fp32_")[0] for p in plans] == ["inpainter_256", "segmenter"]
    call = trt.calls[0]
    assert call["flags"] == 2 and call["workspace"] == 2 << 30 and call["opt_level"] == 4
    assert call["profiles"] == [{"image": [[1, 1, 16, 112, 112], [4, 1, 16, 112, 112], [8, 1, 16, 112, 112]]}]
    assert trt.calls[1]["timing_cache_in"] == 1  # the cache grown by the first build is reused
    cache = out / f"timing_{H100.slug()}_trt10.8.0.43.cache"
    assert cache.read_bytes() == b"++"
    meta = engines.read_sidecar(plans[1])
    assert meta["builder"]["max_batch"] == 8 and meta["io"]["inputs"][0]["name"] == "image"
    assert meta["onnx_sha256"] == engines.file_sha256(Path(meta["onnx_file"]))
    assert "built" in res.output

    # again: everything fits, nothing is built
    res = _cli(*args)
    assert res.exit_code == 0 and len(trt.calls) == 2 and res.output.count("fits") >= 2

    # --force rebuilds in place
    res = _cli(*args, "--force")
    assert res.exit_code == 0 and len(trt.calls) == 4 and sorted(out.glob("*.plan")) == plans

    # another TensorRT: rebuilt, saying why; the old plans stay (another machine may use them)
    trt11 = _install(monkeypatch, version="11.1.0")
    res = _cli(*args)
    assert res.exit_code == 0, res.stderr
    assert trt11.calls[0]["flags"] == 0  # 11.x: strongly typed without the flag
    assert "rebuilt" in res.output and len(list(out.glob("*.plan"))) == 4

    # a changed profile supersedes the plan built on this GPU and TensorRT
    res = _cli(*[a if a != "8" else "4" for a in args])
    assert res.exit_code == 0 and len(list(out.glob("*.plan"))) == 4


def test_build_failures_are_one_line(monkeypatch, fake_gpu, tmp_path):
    _install(monkeypatch, fail_parse=True)
    _one_line_error(_cli("--out", str(tmp_path), "--precision", "fp32", "--resolutions", "128"),
                    "cannot parse segmenter.onnx", "UNSUPPORTED_NODE")
    _install(monkeypatch, fail_build=True)
    _one_line_error(_cli("--out", str(tmp_path), "--precision", "fp32", "--resolutions", "128"),
                    "could not build an engine for segmenter")
    assert not list(tmp_path.glob("*.plan"))


def test_tensorrt_backend_refuses_without_tensorrt_or_on_the_cpu(no_tensorrt):
    from bmltrt.runtime.backends import make_backend

    with pytest.raises(BmlError, match="TensorRT is not installed"):
        make_backend("tensorrt", "gpu")
    with pytest.raises(BmlError, match="GPU only"):
        make_backend("tensorrt", "cpu")
    assert not engines.tensorrt_ready(ModelStore.open(), None, "fp16")
