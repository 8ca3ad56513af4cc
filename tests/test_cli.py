import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bmltrt.cli import app

from conftest import has_gpu


def test_help_lists_the_commands():
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("synth", "train", "export", "detect", "demo", "evaluate", "doctor"):
        assert cmd in r.output


def test_doctor_names_each_backend():
    r = CliRunner().invoke(app, ["doctor"])
    assert r.exit_code == 0
    for name in ("onnxruntime", "torch", "tensorrt", "cupy", "cucim", "gpu"):
        assert name in r.output


def test_gpu_request_falls_back_with_a_warning(phantom_case, tmp_path):
    if has_gpu():
        return  # the fallback only shows without a GPU
    scan, _ = phantom_case
    r = CliRunner().invoke(app, ["detect", str(scan), "-o", str(tmp_path), "--device", "gpu"])
    assert r.exit_code == 0, r.stderr
    assert "warning:" in r.stderr and "running on the CPU" in r.stderr
    rep = json.loads((tmp_path / "knee_report.json").read_text())
    assert rep["device"] == "cpu"


def test_evaluate_writes_scores(tiny_dataset, tmp_path):
    r = CliRunner().invoke(app, ["evaluate", str(tiny_dataset), "--split", "test", "-o", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output + r.stderr
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    ours = ev["rows"][0]
    assert ours["key"] == "ours/shipped/256" and ev["data"]["n_cases"] == 1
    assert 0.0 <= ours["summary"]["volume"]["pooled"]["dice"] <= 1.0
    assert ours["femur_dice_mean"] > 0.95
    assert (tmp_path / "ev" / "cases.csv").read_text().startswith("row,case,")


def test_model_card_figures_on_a_phantom(tiny_dataset, tmp_path):
    """`evaluate model-card`: the femur is found, and on healthy femur slices (grown by
    detect's margin, padded as detect pads) the generator repaints closer to the truth than a
    blurred fill of the same mask does."""
    r = CliRunner().invoke(app, ["evaluate", "model-card", str(tiny_dataset), "--split", "test",
                                 "-o", str(tmp_path / "card.json")])
    assert r.exit_code == 0, r.output + r.stderr
    card = json.loads((tmp_path / "card.json").read_text())
    # -o never replaces a file unasked, never writes into the dataset, and is checked first
    again = CliRunner().invoke(app, ["evaluate", "model-card", str(tiny_dataset), "-o", str(tmp_path / "card.json")])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    manifest = (tiny_dataset / "dataset.json").read_bytes()
    onto = CliRunner().invoke(app, ["evaluate", "model-card", str(tiny_dataset), "-o", str(tiny_dataset / "dataset.json"),
                                    "--overwrite"])
    assert onto.exit_code == 2 and "inside the dataset" in onto.stderr
    assert (tiny_dataset / "dataset.json").read_bytes() == manifest
    folder = CliRunner().invoke(app, ["evaluate", "model-card", str(tiny_dataset), "-o", str(tmp_path)])
    assert folder.exit_code == 2 and "is a folder" in folder.stderr
    assert card["cases"] == 1 and card["femur_dice_mean"] > 0.95
    assert card["femur_dice_mean"] <= card["femur_dice_ceiling_of_working_grid"] + 0.02
    assert card["healthy_slices"] > 5
    l1 = card["masked_l1"]
    assert 0 < l1["lama"] < l1["blurred_fill"] and l1["lama"] < l1["ring_mean"]


def test_an_interrupted_training_run_says_how_to_go_on(tiny_dataset, tmp_path, monkeypatch):
    """Ctrl-C in `train` keeps the checkpoint, and the hint says --resume (a plain rerun
    is refused over an existing checkpoint)."""
    pytest.importorskip("torch")
    import bmltrt.training.segmenter as seg

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(seg, "train_segmenter", interrupted)
    r = CliRunner().invoke(app, ["train", "segmenter", "--data", str(tiny_dataset), "--out", str(tmp_path / "run")])
    assert r.exit_code == 130 and "no checkpoint was saved yet" in r.stderr, r.stderr  # nothing to resume
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "checkpoint.pt").write_bytes(b"")  # as a run stopped after its first save leaves it
    r = CliRunner().invoke(app, ["train", "segmenter", "--data", str(tiny_dataset), "--out", str(tmp_path / "run2"),
                                 "--resume"])
    assert r.exit_code == 130 and "add --resume" in r.stderr, r.stderr


def test_post_options_reach_the_detector(phantom_case, tmp_path):
    scan, _ = phantom_case
    r = CliRunner().invoke(app, ["detect", str(scan), "-o", str(tmp_path), "--floor", "0.99", "--no-mirror"])
    assert r.exit_code == 0, r.stderr
    rep = json.loads((tmp_path / "knee_report.json").read_text())
    assert rep["config"]["post"]["floor"] == 0.99
    assert rep["config"]["mirror_tta"] is False  # on by default (DetectConfig), off on request
    assert rep["lesion_count"] == 0  # nothing passes a floor of 0.99
    assert not np.any(rep["lesions"])


def test_the_readme_names_every_environment_variable_the_code_reads():
    import re

    root = Path(__file__).resolve().parents[1]
    read = set()
    for folder in ("bmltrt", "scripts"):
        for f in (root / folder).rglob("*"):
            if f.suffix in (".py", ".sh"):
                read |= set(re.findall(r"BMLTRT_[A-Z_]+", f.read_text()))
    assert {"BMLTRT_MODELS", "BMLTRT_THREADS"} <= read  # the search itself works
    readme = (root / "README.md").read_text()
    assert not [v for v in sorted(read) if f"`{v}" not in readme]


def test_an_internal_error_outside_any_scan_is_logged_to_a_new_private_file(tmp_path, monkeypatch):
    """The log went to a fixed name in the shared temp folder, appended to and following links."""
    import tempfile

    from typer.testing import CliRunner

    import bmltrt.doctor
    from bmltrt.cli import app

    def broken():
        raise RuntimeError("a bug in doctor")

    monkeypatch.setattr(bmltrt.doctor, "check", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (tmp_path / "bmltrt-errors.log").symlink_to(victim)  # a link planted under the old fixed name
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 1 and "Traceback" not in res.output + res.stderr
    line = res.stderr.strip()
    assert line.startswith("error: internal error on this command (RuntimeError: a bug in doctor)"), line
    log = Path(line.split("full traceback in ")[1].split(" | ")[0])
    assert log.parent == tmp_path and log.name.startswith("bmltrt-errors-") and not log.is_symlink()
    assert "RuntimeError: a bug in doctor" in log.read_text() and oct(log.stat().st_mode)[-3:] == "600"
    assert victim.read_text() == "keep me\n"


def test_ctrl_c_while_the_command_line_loads_is_one_line(tmp_path):
    """Ctrl-C in the first few tenths of a second (numpy, rich, typer loading) printed a traceback."""
    import subprocess
    import sys

    code = ("import builtins, os, signal\n"
            "real = builtins.__import__\n"
            "def stop_in(name, *a, **k):\n"
            "    if name == 'bmltrt.cli':\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = stop_in\n"
            "from bmltrt.__main__ import main\n"
            "main()\n")
    for sig, rc, said in (("SIGINT", 130, "interrupt"), ("SIGTERM", 143, "SIGTERM")):
        r = subprocess.run([sys.executable, "-c", code.replace("SIGINT", sig), "doctor"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == rc and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip() == f"error: {said}: stopped before the end | run the command again"


@pytest.mark.parametrize("term", [False, True])
def test_ctrl_c_or_sigterm_while_typer_parses_is_one_line(monkeypatch, term):
    """typer turns a KeyboardInterrupt before the command runs into a silent exit 130."""
    import typer.core
    from typer.testing import CliRunner

    from bmltrt.cli import app
    from bmltrt.errors import raise_interrupted

    def stopped(self, ctx, args):
        if term:
            raise_interrupted(15, None)
        raise KeyboardInterrupt

    monkeypatch.setattr(typer.core.TyperGroup, "resolve_command", stopped)
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == (143 if term else 130)
    assert res.stderr.strip() == f"error: {'SIGTERM' if term else 'interrupt'}: stopped before the end | run the command again"


def test_ctrl_c_in_doctor_is_one_line(monkeypatch):
    from typer.testing import CliRunner

    import bmltrt.doctor
    from bmltrt.cli import app

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(bmltrt.doctor, "check", interrupted)
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 130 and res.stderr.strip().startswith("error: interrupt: stopped before the end")
    assert len(res.stderr.strip().splitlines()) == 1
