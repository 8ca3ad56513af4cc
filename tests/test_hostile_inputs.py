"""A hostile user's tour of `bmltrt detect` and friends (issue 12).

Every case asserts the exit code, that the message is one line (one "error:" line, no
traceback), which files exist afterwards, and that the input bytes are unchanged.
Cases that need no detection use small volumes and fail before any network runs; the
few that need one share the session's phantom and one finished output set.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from typer.testing import CliRunner

from bmltrt.cli import app
from bmltrt.io.outputs import PARTIAL_PREFIX, OutputSet
from bmltrt.report import SUMMARY_NAME

from conftest import REPO, SHARED_DATA, has_gpu, has_torch, save_nifti

DICOM_DIR = SHARED_DATA / "real" / "dicom" / "pymskt_mese_t2"
OUTPUT_NAMES = ("_bml.nii.gz", "_femur.nii.gz", "_overlay.png", "_report.json")


# ---- helpers ---------------------------------------------------------------------------

def digest(paths) -> dict:
    """sha256 of every file under `paths`, but the output folder's summary (a run into its input
    folder remakes it: it is an output, not an input)."""
    out = {}
    for p in paths:
        p = Path(p)
        for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []):
            if f.name != "bmltrt_summary.csv":
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in Path(d).iterdir()) if Path(d).exists() else []


def run(args, inputs=(), code=2, errors=1):
    """Run the CLI; check exit code, input bytes unchanged, and (for failures) one line per failed scan."""
    before = digest(inputs)
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    assert digest(inputs) == before, "an input file changed"
    text = res.stdout + res.stderr
    assert "Traceback" not in text, text
    if code != 0:
        errs = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(errs) == errors, res.stderr
    return res


def error_line(res) -> str:
    return next(ln for ln in res.stderr.splitlines() if ln.startswith("error:"))


def smooth_volume(shape, seed=0, scale=1000.0):
    """Image-like (smooth, many grey values): passes the noise and label-map rules."""
    rng = np.random.default_rng(seed)
    return (ndi.gaussian_filter(rng.random(shape), 2) * scale).astype(np.float32)


def small_scan(path, shape=(10, 24, 24), spacing=(3.0, 0.5, 0.5)):
    """A tiny image: loads fine, then is refused as too small to hold a knee (fast)."""
    return save_nifti(path, smooth_volume(shape), np.diag([*spacing, 1.0]))


@pytest.fixture(scope="module")
def done_set(phantom_case, tmp_path_factory):
    """One finished detect run on the phantom: (scan path, output folder)."""
    scan, _ = phantom_case
    out = tmp_path_factory.mktemp("done")
    res = CliRunner().invoke(app, ["detect", str(scan), "-o", str(out)])
    assert res.exit_code == 0, res.stderr
    assert listing(out) == sorted([SUMMARY_NAME] + [f"knee{e}" for e in OUTPUT_NAMES])
    return scan, out


def copy_set(done_set, dest: Path, with_scan=True) -> Path:
    scan, out = done_set
    dest.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        shutil.copy2(f, dest / f.name)
    if with_scan:
        shutil.copy2(scan, dest / scan.name)
    return dest


# ---- outputs: naming, the overwrite guard, inputs never overwritten ----------------------

def read_summary(folder: Path) -> dict[str, dict]:
    import csv

    with open(folder / SUMMARY_NAME, newline="", encoding="utf-8") as f:
        return {r["scan"]: r for r in csv.DictReader(f)}


def test_the_summary_lists_the_folders_scans_and_this_runs_failures(tmp_path, done_set):
    rows = read_summary(done_set[1])
    rep = json.loads((done_set[1] / "knee_report.json").read_text())
    assert list(rows) == ["knee"]
    k = rows["knee"]
    assert (k["status"], int(k["lesions"]), float(k["lesion_volume_mm3"]), k["report"], k["error"]) == \
        ("ok", rep["lesion_count"], rep["lesion_volume_mm3"], "knee_report.json", "")
    assert float(k["femur_volume_mm3"]) == rep["femur_volume_mm3"] and k["input"] == str(done_set[0])
    # a rerun that writes nothing (knee refused: complete, no --overwrite; a broken file) leaves
    # the summary as it was, and prints the error lines and the table only
    d = copy_set(done_set, tmp_path / "d")
    bad = tmp_path / "in" / "Broken.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"not a scan")
    before = (d / SUMMARY_NAME).read_bytes()
    res = run(["detect", d / "knee.nii.gz", bad, "-o", d], inputs=[d / "knee.nii.gz", bad], errors=2)
    assert (d / SUMMARY_NAME).read_bytes() == before and "outputs in" not in res.stdout
    assert "0 of 2 scans done" in res.stdout
    # with this run's failures beside the folder's reports (what detect writes when it made a set)
    from bmltrt.report import write_summary

    write_summary(d, [("knee", str(done_set[0]), "error: outputs exist already"),
                      ("Broken", str(bad), "error: not a readable NIfTI file"),
                      ("broken", str(bad).lower(), "error: a broken symbolic link"),  # another case: its own row
                      ("knee", str(bad.parent / "knee.nii.gz"), "error: a broken symbolic link")])  # another knee
    import csv

    with open(d / SUMMARY_NAME, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [(r["scan"], r["status"]) for r in table] == [("Broken", "failed"), ("broken", "failed"), ("knee", "ok"),
                                                        ("knee", "failed")]
    rows = {r["scan"]: r for r in table[:3]}
    assert rows["knee"]["status"] == "ok" and "exist already" in rows["knee"]["error"]  # its outputs stand
    assert rows["knee"]["lesions"] == str(rep["lesion_count"])
    assert rows["Broken"]["status"] == "failed" and rows["Broken"]["input"] == str(bad)
    assert "not a readable NIfTI" in rows["Broken"]["error"] and rows["Broken"]["lesions"] == ""
    # one scan refused: its line is the whole answer (no table), and no folder is left
    res = run(["detect", bad, "-o", tmp_path / "o"], inputs=[bad])
    assert not (tmp_path / "o").exists() and res.stdout.strip() == ""


def test_the_summary_and_reports_name_inputs_by_absolute_path(tmp_path, phantom_case, monkeypatch):
    """Scans given relative to the current folder: the summary (read from anywhere) and the
    reports name them absolutely, good and failed alike."""
    (tmp_path / "in").mkdir()
    shutil.copy2(phantom_case[0], tmp_path / "in" / "knee.nii.gz")
    (tmp_path / "in" / "Broken.nii.gz").write_bytes(b"not a scan")
    monkeypatch.chdir(tmp_path)
    run(["detect", "in/knee.nii.gz", "in/Broken.nii.gz", "-o", "out"])  # exit 2: one scan failed
    rows = read_summary(tmp_path / "out")
    assert rows["knee"]["input"] == str(tmp_path / "in" / "knee.nii.gz")
    assert rows["Broken"]["input"] == str(tmp_path / "in" / "Broken.nii.gz")
    rep = json.loads((tmp_path / "out" / "knee_report.json").read_text())
    assert rep["input"]["path"] == str(tmp_path / "in" / "knee.nii.gz")


def test_a_summary_file_bmltrt_did_not_write_is_refused_before_any_work(tmp_path, done_set):
    d = copy_set(done_set, tmp_path / "d", with_scan=False)
    scan = done_set[0]
    (d / SUMMARY_NAME).write_text("my own notes\n")
    for f in d.glob("knee_*"):
        f.unlink()  # so that the scan itself would run
    res = run(["detect", scan, "-o", d], inputs=[scan])
    assert "was not written by bmltrt" in error_line(res) and "--overwrite" in error_line(res)
    assert listing(d) == [SUMMARY_NAME] and (d / SUMMARY_NAME).read_text() == "my own notes\n"
    (d / SUMMARY_NAME).unlink()
    (d / SUMMARY_NAME).mkdir()
    assert "not a file bmltrt wrote" in error_line(run(["detect", scan, "-o", d, "--overwrite"], inputs=[scan]))


def test_summary_cells_that_a_spreadsheet_would_run_stay_text(tmp_path, done_set):
    from bmltrt.report import write_summary

    d = tmp_path / "d"
    d.mkdir()
    shutil.copy2(done_set[1] / "knee_report.json", d / "=HYPERLINK(0)_report.json")
    rep = json.loads((d / "=HYPERLINK(0)_report.json").read_text())
    (d / "=HYPERLINK(0)_report.json").write_text(json.dumps(rep | {"backend": "=cmd|' /C calc'!A0", "input": "x",
                                                                   "timings_s": [1]}))
    (d / "damaged_report.json").write_text('{"bmltrt_version": "0.1.0", "lesion_c')  # cut short
    (d / "theirs_report.json").write_text('{"not": "ours"}')
    write_summary(d, [("@SUM(1)", "-x.nii.gz", "error: -- a failure")])
    rows = read_summary(d)
    assert sorted(rows) == ["'=HYPERLINK(0)", "'@SUM(1)", "damaged"]
    assert rows["'@SUM(1)"]["input"] == "'-x.nii.gz" and rows["'@SUM(1)"]["error"] == "error: -- a failure"
    hyper = rows["'=HYPERLINK(0)"]
    assert float(hyper["lesion_volume_mm3"]) > 0 and hyper["backend"].startswith("'=")  # numbers stay numbers
    assert hyper["input"] == "" and hyper["seconds"] == ""  # fields of the wrong type are left out, not a crash
    assert rows["damaged"]["status"] == "report unreadable" and "JSONDecodeError" in rows["damaged"]["error"]


def test_a_scan_whose_femur_failed_the_check_is_not_ok_in_the_summary(tmp_path, done_set):
    """Its figures are not to be used before the overlay is looked at: a cohort table must
    say so, not "ok"."""
    from bmltrt.report import CHECK_FEMUR, write_summary

    d = tmp_path / "d"
    d.mkdir()
    rep = json.loads((done_set[1] / "knee_report.json").read_text())
    (d / "good_report.json").write_text(json.dumps(rep))
    odd = rep | {"femur_check": rep["femur_check"] | {"plausible": False, "reasons": ["in pieces"]}}
    (d / "odd_report.json").write_text(json.dumps(odd))
    write_summary(d, [("odd", rep["input"]["path"], "error: outputs exist already")])  # its outputs stand
    rows = read_summary(d)
    assert rows["good"]["status"] == "ok" and rows["odd"]["status"] == CHECK_FEMUR == "check femur"
    assert rows["odd"]["femur_plausible"] == "False" and "exist already" in rows["odd"]["error"]


def test_foreign_femur_file_next_to_the_scan_is_never_overwritten(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    small_scan(d / "k.nii.gz")
    femur = small_scan(d / "k_femur.nii.gz")  # the user's own file, with our output's name
    res = run(["detect", d, "-o", d], inputs=[d], errors=2)  # k, and k_femur.nii.gz as a scan of its own
    assert "an output would overwrite an input of this run | file: " + str(femur) in res.stderr
    assert listing(d) == ["k.nii.gz", "k_femur.nii.gz"] and femur.exists()


def test_upper_case_names_do_not_bypass_the_guard(tmp_path, done_set):
    d = tmp_path / "in"
    d.mkdir()
    scan = shutil.copy2(done_set[0], d / "K.NII.GZ")
    foreign = small_scan(tmp_path / "K_BML.NII.GZ")
    out = tmp_path / "out"
    out.mkdir()
    shutil.move(foreign, out / "K_BML.NII.GZ")
    res = run(["detect", scan, "-o", out], inputs=[d, out])
    assert "did not write" in error_line(res)
    assert listing(out) == ["K_BML.NII.GZ"]


def test_complete_set_is_not_overwritten_without_overwrite(tmp_path, done_set):
    d = copy_set(done_set, tmp_path / "d")
    res = run(["detect", d / "knee.nii.gz", "-o", d], inputs=[d])
    assert "exist already" in error_line(res)


def test_folder_run_into_itself_skips_our_masks(tmp_path, done_set):
    d = copy_set(done_set, tmp_path / "d")
    res = run(["detect", d, "-o", d], inputs=[d])
    assert "skipped 2 mask(s) that bmltrt wrote" in res.stderr
    assert "knee_bml_bml" not in " ".join(listing(d))
    assert len(listing(d)) == 6  # the scan, its four outputs, the summary


def test_our_mask_given_as_a_scan_is_refused(tmp_path, done_set):
    d = copy_set(done_set, tmp_path / "d", with_scan=False)
    res = run(["detect", d / "knee_bml.nii.gz", "-o", tmp_path / "o"], inputs=[d])
    assert "mask that bmltrt wrote" in error_line(res)
    assert listing(tmp_path / "o") == []


def test_interrupted_set_is_completed_by_a_rerun(tmp_path, done_set):
    d = copy_set(done_set, tmp_path / "d")
    (d / "knee_report.json").unlink()  # killed between the renames: no completion mark
    (d / "knee_overlay.png").unlink()
    run(["detect", d / "knee.nii.gz", "-o", d], inputs=[d / "knee.nii.gz"], code=0)
    assert listing(d) == sorted(["knee.nii.gz", SUMMARY_NAME] + [f"knee{e}" for e in OUTPUT_NAMES])
    assert json.loads((d / "knee_report.json").read_text())["lesion_count"] >= 1


def test_output_folder_is_a_file(tmp_path):
    scan = small_scan(tmp_path / "k.nii.gz")
    f = tmp_path / "out.txt"
    f.write_text("mine")
    res = run(["detect", scan, "-o", f], inputs=[scan, f])
    assert "is a file" in error_line(res)


def test_output_folder_below_a_file(tmp_path):
    scan = small_scan(tmp_path / "k.nii.gz")
    f = tmp_path / "blocker"
    f.write_text("mine")
    res = run(["detect", scan, "-o", f / "sub"], inputs=[scan, f])
    assert "blocker" in error_line(res)


def test_read_only_output_folder(tmp_path, monkeypatch):
    scan = small_scan(tmp_path / "k.nii.gz")
    real_mkdir = Path.mkdir

    def ro_mkdir(self, *a, **k):
        if "ro" in self.parts:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", ro_mkdir)
    res = run(["detect", scan, "-o", tmp_path / "ro" / "out"], inputs=[scan])
    assert "read-only" in error_line(res)
    assert not (tmp_path / "ro").exists()


def test_full_disk_fails_the_scan_leaves_nothing_and_the_batch_goes_on(tmp_path, phantom_case, monkeypatch):
    import bmltrt.report as report

    scan, _ = phantom_case
    other = small_scan(tmp_path / "tiny.nii.gz")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(report, "write_nifti", full)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["detect", str(scan), str(other), "-o", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.stdout + res.stderr
    errs = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 2 and "No space left" in errs[0] and "tiny.nii.gz" in errs[1]  # the batch went on
    assert listing(out) == []  # no partial set, no staging folder


def test_two_inputs_with_one_name(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    sa, sb = small_scan(a / "k.nii.gz"), small_scan(b / "k.nii")
    res = run(["detect", sa, sb, "-o", tmp_path / "o"], inputs=[a, b])
    assert "same outputs" in error_line(res)
    assert not (tmp_path / "o").exists()


def test_names_that_differ_only_by_case_collide(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    sa, sb = small_scan(a / "Knee.nii.gz"), small_scan(b / "knee.NII.GZ")
    res = run(["detect", sa, sb, "-o", tmp_path / "o"], inputs=[a, b])
    assert "same outputs" in error_line(res)


def test_odd_file_names_are_named_and_guarded(tmp_path, done_set):
    odd = "my knee.v2 ü [L]"
    d = tmp_path / "d"
    d.mkdir()
    scan = shutil.copy2(done_set[0], d / f"{odd}.NII.GZ")
    for f in done_set[1].iterdir():  # a complete set under the odd name
        shutil.copy2(f, d / f.name.replace("knee", odd))
    res = run(["detect", scan, "-o", d], inputs=[d])
    line = error_line(res)
    assert "exist already" in line and f"{odd}_report.json" in line  # the [L] survives rich markup


def test_hidden_leftovers_are_never_taken_for_scans(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / ".k_bml.nii.gz.x1y2.part").write_bytes(b"")
    (d / ".old_tmp.nii.gz").write_bytes(b"")  # an old-style temporary name
    (d / f"{PARTIAL_PREFIX}k").mkdir()
    res = run(["detect", d, "-o", tmp_path / "o"], inputs=[d])
    assert "no NIfTI files" in error_line(res)
    assert "skipped hidden: .old_tmp.nii.gz" in error_line(res) and "by its file name" in error_line(res)


# ---- the output set itself: locks, interruptions, commits -------------------------------

def _writers(fail=None, exc=None):
    def make(kind):
        def w(p):
            if kind == fail:
                raise exc
            Path(p).write_text(kind)
        return w
    return {k: make(k) for k in ("bml", "femur", "overlay", "report")}


def test_interrupt_while_writing_leaves_no_partial_set(tmp_path):
    from bmltrt.io.outputs import write_output_set

    outs = OutputSet(tmp_path, "k")
    with pytest.raises(KeyboardInterrupt):
        write_output_set(outs, _writers("report", KeyboardInterrupt()))
    assert listing(tmp_path) == []


def test_failed_overwrite_keeps_the_old_set_whole(tmp_path):
    from bmltrt.io.outputs import write_output_set

    outs = OutputSet(tmp_path, "k")
    write_output_set(outs, _writers())  # text files: "ours" only by name, so the guard is exercised below
    before = digest([tmp_path])
    with pytest.raises(Exception):
        write_output_set(outs, _writers("overlay", OSError(errno.ENOSPC, "full")), overwrite=True)
    assert digest([tmp_path]) == before


def test_overwrite_of_a_set_named_in_another_case_replaces_it_whole(tmp_path):
    """k1_* replaced by K1_* with --overwrite: the old report was unlinked twice, which failed
    after the old masks were gone and left a new set without its report."""
    from bmltrt.io.outputs import write_output_set

    write_output_set(OutputSet(tmp_path, "k1"), _writers())
    write_output_set(OutputSet(tmp_path, "K1"), _writers(), overwrite=True)
    assert listing(tmp_path) == sorted(f"K1{e}" for e in OUTPUT_NAMES)


def test_a_concurrent_run_holds_the_scan(tmp_path):
    from bmltrt.errors import BmlError
    from bmltrt.io.outputs import write_output_set

    outs = OutputSet(tmp_path, "k")
    outs.staging.mkdir()
    (outs.staging / "pid").write_text(str(os.getppid()))  # a live process
    with pytest.raises(BmlError, match="another bmltrt run"):
        write_output_set(outs, _writers())
    assert listing(tmp_path) == [outs.staging.name]
    with pytest.raises(BmlError, match="another bmltrt run"):  # detect asks before the work, not after it
        outs.check_writable(overwrite=True)


def test_a_killed_runs_staging_folder_is_taken_over(tmp_path):
    from bmltrt.io.outputs import write_output_set

    outs = OutputSet(tmp_path, "k")
    outs.staging.mkdir()
    (outs.staging / "pid").write_text("999999999")  # no such process
    write_output_set(outs, _writers())
    assert listing(tmp_path) == sorted(f"k{e}" for e in OUTPUT_NAMES)



def test_an_hours_old_lock_of_a_live_pid_is_taken_over(tmp_path):
    """After a SIGKILL the pid can be reused (pid 1 in a container is always alive): a lock
    untouched for hours is stale whatever its pid."""
    from bmltrt.io.outputs import LOCK_MAX_AGE_S, write_output_set

    outs = OutputSet(tmp_path, "k")
    outs.staging.mkdir()
    (outs.staging / "pid").write_text(str(os.getppid()))  # a live process
    old = time.time() - LOCK_MAX_AGE_S - 60
    os.utime(outs.staging, (old, old))
    write_output_set(outs, _writers())
    assert listing(tmp_path) == sorted(f"k{e}" for e in OUTPUT_NAMES)


def test_a_folder_where_an_output_goes_is_refused_before_writing(tmp_path):
    """With --overwrite the set used to be moved in file by file until the rename onto the
    folder failed, leaving a mask without its report."""
    from bmltrt.errors import BmlError
    from bmltrt.io.outputs import write_output_set

    outs = OutputSet(tmp_path, "k")
    (tmp_path / "k_overlay.png").mkdir()
    (tmp_path / "k_overlay.png" / "keep").write_text("x")
    with pytest.raises(BmlError, match="non-file is where an output goes"):
        write_output_set(outs, _writers(), overwrite=True)
    assert listing(tmp_path) == ["k_overlay.png"]

def test_sigterm_leaves_a_complete_set_or_nothing(tmp_path, phantom_case):
    scan, _ = phantom_case
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "bmltrt", "detect", str(scan), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 120:
        if (out / f"{PARTIAL_PREFIX}knee").exists():  # writing has begun
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err
    names = listing(out)
    if proc.returncode == 143:
        assert names == [] and "SIGTERM" in err
    else:  # it had finished before the signal came
        assert proc.returncode == 0 and names == sorted(f"knee{e}" for e in OUTPUT_NAMES)


# ---- internal errors: one line, a log, the batch goes on --------------------------------

def test_internal_error_is_logged_and_the_batch_goes_on(tmp_path, phantom_case, monkeypatch):
    from bmltrt.pipeline import Detector

    scan, _ = phantom_case
    d = tmp_path / "in"
    d.mkdir()
    first = shutil.copy2(scan, d / "a_first.nii.gz")
    real = Detector.detect_checked

    def buggy(self, s, progress=None):
        if s.name == "a_first":
            raise ZeroDivisionError("a bug")
        return real(self, s, progress)

    monkeypatch.setattr(Detector, "detect_checked", buggy)
    out = tmp_path / "out"
    res = run(["detect", first, scan, "-o", out], inputs=[d, scan])
    line = error_line(res)
    assert "internal error on" in line and "a_first" in line and "ZeroDivisionError" in line
    log = out / "bmltrt-errors.log"
    assert str(log) in line and "Traceback" in log.read_text()
    assert sorted(listing(out)) == sorted(["bmltrt-errors.log", SUMMARY_NAME] + [f"knee{e}" for e in OUTPUT_NAMES])


def test_corrupt_model_file_is_refused(tmp_path, phantom_case):
    models = tmp_path / "models"
    shutil.copytree(REPO / "export", models)
    onnx = models / "segmenter.onnx"
    b = bytearray(onnx.read_bytes())
    b[len(b) // 2] ^= 0xFF
    onnx.write_bytes(bytes(b))
    scan, _ = phantom_case
    res = run(["detect", scan, "-o", tmp_path / "o", "--models", models], inputs=[scan])
    assert "sha256" in error_line(res) and "segmenter" in error_line(res)
    assert listing(tmp_path / "o") == []


# ---- options out of range: every command --------------------------------------------------

OPTION_CASES = [
    ["detect", "{scan}", "-o", "{out}", "--batch-size", "0"],
    ["detect", "{scan}", "-o", "{out}", "--batch-size", "-3"],
    ["detect", "{scan}", "-o", "{out}", "--floor", "-1"],
    ["detect", "{scan}", "-o", "{out}", "--floor", "nan"],
    ["detect", "{scan}", "-o", "{out}", "--opening-mm", "100"],
    ["detect", "{scan}", "-o", "{out}", "--min-area-mm2", "-5"],
    ["detect", "{scan}", "-o", "{out}", "--resolution", "0"],
    ["detect", "{scan}", "-o", "{out}", "--echo", "0"],
    ["detect", "{scan}", "-o", "{out}", "--backend", "tensorrt"],
    ["synth", "{out}", "--cases", "0"],
    ["synth", "{out}", "--seed", "-1"],
    ["synth", "{out}", "--workers", "0"],
    ["train", "segmenter", "--data", "{out}", "--out", "{out}", "--steps", "0"],
    ["train", "segmenter", "--data", "{out}", "--out", "{out}", "--lr", "-1"],
    ["train", "segmenter", "--data", "{out}", "--out", "{out}", "--runtime-smoothing-p", "1.5"],
    ["train", "segmenter", "--data", "{out}", "--out", "{out}", "--fat-like-marrow-p", "-0.1"],
    ["train", "inpainter", "--data", "{out}", "--out", "{out}", "--time-limit", "0"],
    ["train", "inpainter", "--data", "{out}", "--out", "{out}", "--resolution", "100"],
    ["train", "inpainter", "--data", "{out}", "--out", "{out}", "--batch-size", "0"],
    ["evaluate", "{out}", "-o", "{out}", "--limit", "0"],
    ["evaluate", "{out}", "-o", "{out}", "--split", "nope"],
    ["export", "--out", "{out}", "--default-resolution", "0"],
    ["export", "--out", "{out}", "--from-onnx", "export", "--calibration-seed", "-1"],
    ["demo", "-o", "{out}", "--seed", "-1"],
]


@pytest.mark.parametrize("args", OPTION_CASES, ids=lambda a: "_".join(x.strip("-") for x in a if "{" not in x))
def test_option_out_of_range(tmp_path, args):
    scan = small_scan(tmp_path / "k.nii.gz")
    out = tmp_path / "out"
    res = run([a.format(scan=scan, out=out) for a in args], inputs=[scan])
    assert listing(out) == []
    assert len(error_line(res)) < 400


def test_export_checks_its_checkpoints_before_any_work(tmp_path):
    """A checkpoint of the other network, a file that is not a checkpoint, or a graph given
    where a checkpoint goes: one line before any graph is made (it was a traceback after
    minutes of cleaning graphs); the models folder is not made."""
    torch = pytest.importorskip("torch")
    inp = tmp_path / "inpainter.pt"
    torch.save({"kind": "inpainter", "step": 1, "modules": {"gen": {}}, "config": {}}, inp)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    for args, said in ((["--segmenter", inp], "checkpoint is an inpainter, not a segmenter"),
                       (["--from-onnx", REPO / "export", "--inpainter", text], "not a bmltrt checkpoint"),
                       (["--segmenter", REPO / "export" / "segmenter.onnx"], "takes a training checkpoint (.pt)")):
        res = run(["export", "--out", tmp_path / "models", *args])
        assert said in error_line(res) and not (tmp_path / "models").exists()
    # the hint says what export takes (a graph is refused above), and the --out that is wrong is named
    assert "or a float32 .onnx" not in error_line(run(["export", "--out", tmp_path / "models", "--segmenter", text]))
    assert "--segmenter is a folder, not a checkpoint file" in error_line(
        run(["export", "--out", tmp_path / "models", "--segmenter", tmp_path]))
    res = run(["export", "--out", text / "sub", "--from-onnx", REPO / "export"])
    assert "the models folder (--out) lies under a file" in error_line(res) and "partial" not in error_line(res)


@pytest.mark.skipif(not has_torch(), reason="export needs torch")
def test_export_never_replaces_a_models_folder_unasked(tmp_path):
    import shutil

    models = tmp_path / "good"
    shutil.copytree(REPO / "export", models)
    before = {p.name: p.read_bytes() for p in models.iterdir()}
    res = run(["export", "--from-onnx", REPO / "export", "--resolutions", "128", "--precision", "fp32", "--no-lint",
               "--out", models])
    assert "already holds an export" in error_line(res) and "--overwrite" in error_line(res)
    assert {p.name: p.read_bytes() for p in models.iterdir()} == before


# ---- inputs that are not knee MRI ---------------------------------------------------------

def _no_orientation(p):
    img = nib.Nifti1Image(smooth_volume((20, 200, 200)), np.diag([3.0, 0.8, 0.8, 1.0]))
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    raw = bytearray(img.to_bytes())
    hdr = img.header.copy()
    hdr["qform_code"], hdr["sform_code"] = 0, 0
    raw[:348] = hdr.binaryblock
    p = p.with_name(p.name.replace(".nii.gz", ".nii"))  # header edited in place: uncompressed
    p.write_bytes(bytes(raw))
    return p


def _zero_pixdim(p):
    img = nib.Nifti1Image(smooth_volume((20, 200, 200)), np.diag([3.0, 0.8, 0.8, 1.0]))
    hdr = img.header.copy()
    hdr["qform_code"], hdr["sform_code"] = 1, 0
    hdr["pixdim"][1:4] = 0
    raw = bytearray(img.to_bytes())
    raw[:348] = hdr.binaryblock
    p = p.with_name(p.name.replace(".nii.gz", ".nii"))  # header edited in place: uncompressed
    p.write_bytes(bytes(raw))
    return p


def _one_zero_pixdim_gz(p):
    """Only the slice spacing zero, gzipped: nibabel's loader quietly reads it as 1 mm."""
    import gzip

    raw = bytearray(nib.Nifti1Image(smooth_volume((20, 200, 200)), np.diag([3.0, 0.8, 0.8, 1.0])).to_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])))  # as written (vox_offset set)
    hdr["qform_code"], hdr["sform_code"] = 1, 0
    hdr["pixdim"][1] = 0
    raw[:348] = hdr.binaryblock
    p.write_bytes(gzip.compress(bytes(raw)))
    return p


def _label_map(p):
    v = np.zeros((30, 200, 200), np.uint8)
    v[5:25, 40:160, 40:160] = 1
    v[10:20, 60:100, 60:100] = 7
    return save_nifti(p, v, np.diag([3.0, 0.8, 0.8, 1.0]))


def _blank(p):
    v = np.zeros((30, 200, 200), np.float32)
    v[15, 100, 100] = 500
    return save_nifti(p, v, np.diag([3.0, 0.8, 0.8, 1.0]))


def _near_constant(p):
    v = 1000 + smooth_volume((30, 200, 200), scale=0.1)  # 0.01% contrast
    return save_nifti(p, v.astype(np.float32), np.diag([3.0, 0.8, 0.8, 1.0]))


def _noise(p):
    v = np.random.default_rng(0).random((30, 200, 200)).astype(np.float32) * 1000
    return save_nifti(p, v, np.diag([3.0, 0.8, 0.8, 1.0]))


def _tiny_field(p):
    return small_scan(p)


def _huge_field(p):
    return save_nifti(p, smooth_volume((30, 250, 250)), np.diag([3.0, 3.0, 3.0, 1.0]))


def _thick_slices(p):
    return save_nifti(p, smooth_volume((12, 200, 200)), np.diag([10.0, 0.8, 0.8, 1.0]))


KNEE_RULES = {
    "no_orientation": (_no_orientation, "no orientation"),
    "zero_pixdim": (_zero_pixdim, "voxel size (pixdim"),  # not "pixdim": the file's name has it
    "one_zero_pixdim_gz": (_one_zero_pixdim_gz, "voxel size (pixdim"),
    "label_map": (_label_map, "label map"),
    "blank": (_blank, "blank"),
    "near_constant": (_near_constant, "blank"),
    "noise": (_noise, "noise"),
    "tiny_field_of_view": (_tiny_field, "too small to hold a knee"),
    "huge_field_of_view": (_huge_field, "more than a knee"),
    "slices_too_thick": (_thick_slices, "too thick"),
}


@pytest.mark.parametrize("kind", sorted(KNEE_RULES))
def test_not_a_knee_is_refused(tmp_path, kind):
    make, words = KNEE_RULES[kind]
    scan = make(tmp_path / f"{kind}.nii.gz")
    out = tmp_path / "out"
    res = run(["detect", scan, "-o", out], inputs=[scan])
    assert words in error_line(res) and scan.name in error_line(res)
    assert listing(out) == []


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run(["detect", tmp_path / "empty", "-o", tmp_path / "o"])
    assert "no NIfTI files" in error_line(res) and not (tmp_path / "o").exists()


def test_links_and_pipes_with_scan_names_are_named_not_skipped(tmp_path):
    """A folder entry with a NIfTI name that is no file (a broken link, a looping link, a
    pipe) gets its own line instead of vanishing from the batch; named directly, the same."""
    from bmltrt.io.inputs import expand_inputs

    d = tmp_path / "scans"
    d.mkdir()
    (d / "gone.nii.gz").symlink_to(tmp_path / "moved_away.nii.gz")
    (d / "loop.nii.gz").symlink_to(d / "loop2.nii.gz")
    (d / "loop2.nii.gz").symlink_to(d / "loop.nii.gz")
    os.mkfifo(d / "pipe.nii")
    small_scan(d / "knee.nii.gz")
    found = expand_inputs([str(d)])
    assert [s.path.name for s in found.sources] == ["knee.nii.gz"]
    said = {Path(err.path).name: err.line() for err in found.problems}
    assert sorted(said) == ["gone.nii.gz", "loop.nii.gz", "loop2.nii.gz", "pipe.nii"], said
    assert "broken symbolic link" in said["gone.nii.gz"] and "moved_away.nii.gz" in said["gone.nii.gz"]
    assert "loops" in said["loop.nii.gz"] and "named pipe (FIFO)" in said["pipe.nii"]
    res = run(["detect", d / "loop.nii.gz", "-o", tmp_path / "o"])
    assert "a symbolic link that loops" in error_line(res) and not (tmp_path / "o").exists()
    res = run(["detect", d / "pipe.nii", "-o", tmp_path / "o"])
    assert "named pipe (FIFO), not a regular file" in error_line(res)


def test_control_characters_in_names_are_shown_not_sent_in_the_table_either(tmp_path):
    r"""An escape sequence or a newline in a file name is printed as \x1b / \n, on stderr
    and in the summary table alike (it would recolour the terminal, or make two names look
    the same)."""
    d = tmp_path / "scans"
    d.mkdir()
    (d / "esc\x1b[31mred.nii.gz").symlink_to(tmp_path / "gone1")
    (d / "two\nlines.nii.gz").symlink_to(tmp_path / "gone2")
    res = run(["detect", d, "-o", tmp_path / "o"], errors=2)
    assert "\x1b" not in res.stdout + res.stderr
    assert "esc\\x1b[31mred" in res.stderr and "two\\nlines" in res.stderr
    assert "esc\\x1b" in res.stdout  # the table (rich may wrap it; the escape is what matters)


def test_a_scan_in_a_folder_that_cannot_be_searched_is_one_line(tmp_path, monkeypatch):
    """A scan whose folder this user may not search (EACCES on every stat of it; simulated:
    the suite runs as root) is named in one line, beside the other inputs: Path.is_dir and
    Path.exists raise there instead of answering."""
    from bmltrt.io.inputs import expand_inputs

    locked = tmp_path / "locked"
    locked.mkdir()
    small_scan(locked / "x.nii.gz")
    small_scan(tmp_path / "k.nii.gz")
    real_stat = os.stat

    def stat(path, *a, **k):
        if str(locked) in os.fsdecode(path) and os.fsdecode(path) != str(locked):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_stat(path, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    found = expand_inputs([str(locked / "x.nii.gz"), str(tmp_path / "k.nii.gz")])
    assert [s.path.name for s in found.sources] == ["x.nii.gz", "k.nii.gz"] and not found.problems
    res = run(["detect", locked / "x.nii.gz", "-o", tmp_path / "o"])
    assert "cannot read this file (Permission denied)" in error_line(res) and not (tmp_path / "o").exists()


def test_glob_that_matches_nothing(tmp_path):
    res = run(["detect", str(tmp_path / "*.nii.gz"), "-o", tmp_path / "o"])
    assert "no file matches" in error_line(res)


def test_a_single_dicom_file_points_to_its_folder(tmp_path):
    f = tmp_path / "IM0001"
    f.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    res = run(["detect", f, "-o", tmp_path / "o"], inputs=[f])
    assert "whole series" in error_line(res)


@pytest.mark.skipif(not DICOM_DIR.exists(), reason="../shared/data not present")
def test_dicom_echo_out_of_range(tmp_path):
    res = run(["detect", DICOM_DIR, "-o", tmp_path / "o", "--echo", "9"])
    assert "8 echoes" in error_line(res)


@pytest.mark.skipif(not DICOM_DIR.exists(), reason="../shared/data not present")
def test_dicom_echo_a_single_echo_series_lacks(tmp_path):
    """--echo 2 on a one-echo series is refused, not quietly read as echo 1."""
    from bmltrt.io.dicom import find_series

    d = tmp_path / "one_echo"
    d.mkdir()
    for i, f in enumerate(sorted(DICOM_DIR.glob("*.dcm"))):
        if i % 8 == 0:  # the files come slice by slice, 8 echoes each: keep one echo
            shutil.copy2(f, d / f.name)
    assert len(find_series(d)[0].echo_times) == 1
    res = run(["detect", d, "-o", tmp_path / "o", "--echo", "2"], inputs=[d])
    assert "has one echo" in error_line(res) and "leave out --echo" in error_line(res)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not DICOM_DIR.exists(), reason="../shared/data not present")
def test_the_report_says_which_series_and_echo_and_every_fallback(tmp_path):
    """A DICOM run's report names the series, the echo and its TE; the warnings said on the
    terminal (here: --device gpu on a machine without one, when so) are in the report too."""
    out = tmp_path / "o"
    res = run(["detect", DICOM_DIR, "-o", out, "--echo", "2", "--device", "gpu"], inputs=[DICOM_DIR], code=0)
    rep = json.loads(next(out.glob("*_echo2_report.json")).read_text())
    assert rep["input"]["echo"] == 2 and rep["input"]["echoes"] == 8 and rep["input"]["echo_time_ms"] > 0
    assert rep["input"]["dicom_series_uid"] and rep["input"]["series_number"]
    said = [ln.split("warning: ", 1)[1] for ln in res.stderr.splitlines() if ln.startswith("warning: ")]
    assert said and all(any(r.startswith(w[:40]) for r in rep["warnings"]) for w in said), (said, rep["warnings"])
    if not has_gpu():
        assert any("--device gpu" in w for w in rep["warnings"])


@pytest.mark.skipif(not DICOM_DIR.exists(), reason="../shared/data not present")
def test_dicom_series_with_a_missing_slice(tmp_path):
    d = tmp_path / "series"
    d.mkdir()
    files = sorted(DICOM_DIR.glob("*.dcm"))
    for i, f in enumerate(files):
        if i // 8 != 10:  # drop slice 11 (its 8 echoes)
            shutil.copy2(f, d / f.name)
    res = run(["detect", d, "-o", tmp_path / "o"], inputs=[d])
    line = error_line(res)  # the folder is named, and where the gap lies
    assert "slices are missing" in line and f"file: {d} |" in line and "the widest gap" in line, line


def test_rich_markup_does_not_eat_brackets(capsys):
    from bmltrt.cli import print_error

    print_error("training needs torch | pip install 'bmltrt[train]'")
    assert "bmltrt[train]" in capsys.readouterr().err
    res = CliRunner().invoke(app, ["train", "--help"])
    assert "bmltrt[train]" in res.stdout


def test_evaluate_table_prints_bracketed_names_intact(tmp_path):
    """A data path like `q[/]s` crashed rich (MarkupError, exit 1) after the outputs were
    written, and `syn[x]` printed as `syn`."""
    src = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "oai_painted_test"
    res_dir = tmp_path / "r[x]"
    res_dir.mkdir()
    doc = json.loads((src / "evaluation.json").read_text())
    doc["data"]["path"] = "/data/q[/]s"
    (res_dir / "evaluation.json").write_text(json.dumps(doc))
    r = CliRunner().invoke(app, ["evaluate", "table", str(res_dir), "-o", str(tmp_path / "t[y]")])
    assert r.exit_code == 0, r.output
    assert "q[/]s" in " ".join(r.output.split()) and (tmp_path / "t[y]" / "report.md").exists()


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    """Found by writing a probe file, not after the first scan (a non-root user's folder of
    mode 755 owned by root; the suite may run as root, so the refusal is simulated)."""
    import bmltrt.cli as cli

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "o"))
    monkeypatch.setattr(cli.tempfile, "NamedTemporaryFile", refuse)
    res = run(["detect", tmp_path / "missing.nii.gz", "-o", tmp_path / "o"])
    assert res.exit_code == 2
    line = error_line(res)
    assert "cannot write into the output folder (Permission denied)" in line and "--out" in line


# ---- synthetic DICOM series (no shared data needed) ---------------------------------------------

def write_dicom_series(folder: Path, uid: str, number: int, n: int = 6, pixel_spacing=(0.5, 0.5),
                       truncate: bool = False) -> Path:
    """A small sagittal MR series of `n` uncompressed slices, 3 mm apart."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(number)
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", uid, number
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
        ds.ImagePositionPatient = [3.0 * k, 0, 0]
        ds.PixelSpacing = list(pixel_spacing)
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        px = (rng.random((16, 16)) * 1000).astype(np.uint16).tobytes()
        ds.PixelData = px[: len(px) // 2] if truncate else px
        ds.save_as(folder / f"{uid[-4:]}_{k:03d}.dcm", enforce_file_format=True)
    return folder


def test_dicom_zero_pixel_spacing_is_one_line(tmp_path):
    d = write_dicom_series(tmp_path / "zero_ps", "1.2.3.4.1001", 8, pixel_spacing=(0, 0))
    res = run(["detect", d, "-o", tmp_path / "o"], inputs=[d])
    assert "PixelSpacing" in error_line(res) and "zero voxel size" in error_line(res)
    assert not (tmp_path / "o").exists() or listing(tmp_path / "o") == []


def test_dicom_truncated_pixels_are_called_damaged_not_compressed(tmp_path):
    d = write_dicom_series(tmp_path / "cut", "1.2.3.4.1002", 8, truncate=True)
    res = run(["detect", d, "-o", tmp_path / "o"], inputs=[d])
    assert "cut short or damaged" in error_line(res) and "pylibjpeg" not in error_line(res)


def test_two_series_with_one_series_number_get_their_own_outputs(tmp_path):
    """A re-sent series repeats its SeriesNumber: both must be named apart, not refused."""
    from bmltrt.io.dicom import find_series

    d = tmp_path / "mixed"
    write_dicom_series(d, "1.2.3.4.5555", 8)
    write_dicom_series(d, "1.2.3.4.6666", 8)
    write_dicom_series(d, "1.2.3.4.7777", 9)
    stems = sorted(s.stem for s in find_series(d))
    assert stems == ["mixed_series8_12345555", "mixed_series8_12346666", "mixed_series9"], stems  # no dots


def _set_echo_times(folder: Path, times) -> None:
    """EchoTime of each file of `folder` in name order (None: the tag left out)."""
    import pydicom

    for f, te in zip(sorted(folder.glob("*.dcm")), times):
        ds = pydicom.dcmread(str(f))
        if te is not None:
            ds.EchoTime = te
        ds.save_as(f, enforce_file_format=True)


def test_a_damaged_dicom_file_is_refused_not_dropped(tmp_path):
    """A slice cut short at either end of the stack left no gap: it was skipped without a word
    and the volume lost a slice."""
    d = write_dicom_series(tmp_path / "cut_end", "1.2.3.4.1003", 8)
    last = sorted(d.glob("*.dcm"))[-1]
    last.write_bytes(last.read_bytes()[:300])
    res = run(["detect", d, "-o", tmp_path / "o"], inputs=[d])
    line = error_line(res)
    assert "unreadable DICOM file" in line and last.name in line and "export the series again" in line, line
    assert not (tmp_path / "o").exists()


def test_dicom_images_without_an_echo_time_among_images_with_one_are_refused(tmp_path):
    """Those slices were dropped as "another echo": the first and last ones without a gap to show."""
    from bmltrt.io.inputs import expand_inputs

    d = write_dicom_series(tmp_path / "no_te", "1.2.3.4.1004", 8)
    _set_echo_times(d, [None, 5.0, 5.0, 5.0, 5.0, None])
    found = expand_inputs([str(d)])
    assert found.sources == [] and len(found.problems) == 1
    line = found.problems[0].line()
    assert "2 of 6 images of series 8 have no EchoTime" in line and "1004_000.dcm" in line, line


def test_echo_applies_to_each_series_of_a_folder(tmp_path):
    """--echo 2 on a folder with a one-echo and a two-echo series: the two-echo one at echo 2,
    the other refused by name (not the whole folder)."""
    from bmltrt.io.inputs import expand_inputs

    d = write_dicom_series(tmp_path / "mixecho", "1.2.3.4.2001", 8)
    _set_echo_times(d, [5.0] * 6)
    two = write_dicom_series(tmp_path / "two", "1.2.3.4.2002", 9, n=12)
    _set_echo_times(two, [5.0, 20.0] * 6)
    for f in two.iterdir():
        shutil.move(f, d / f.name)
    found = expand_inputs([str(d)], echo=2)
    assert [(s.series.number, s.series.echo) for s in found.sources] == [("9", 2)]
    assert len(found.problems) == 1 and "--echo 2: series 8 has one echo (TE 5 ms)" in found.problems[0].line()


def test_an_empty_path_is_not_the_current_folder(tmp_path):
    res = run(["detect", "", "-o", tmp_path / "o"])
    assert "empty path" in error_line(res) and not (tmp_path / "o").exists()


def test_echo_on_nifti_inputs_is_said_to_be_ignored(tmp_path, phantom_case):
    scan, _ = phantom_case
    res = CliRunner().invoke(app, ["detect", str(scan), "-o", str(tmp_path / "o"), "--echo", "2"])
    assert res.exit_code == 0 and "--echo applies to DICOM series only" in res.stderr


# ---- the other commands: bad input is one line and exit 2 as well -------------------------------

@pytest.mark.skipif(not has_torch(), reason="training needs torch")
@pytest.mark.parametrize("what, text", [("--config", "hello"), ("--config", "[1, 2]"),
                                        ("--config", '{"featurs": [8, 8, 16, 32, 64, 8]}'),
                                        ("--config", '{"features": [8, -8, 16, 32, 64, 8]}'),
                                        ("--config", '{"patch": "abc"}'), ("--config", '{"overlap": 7}'),
                                        ("--config", '{"deep_supervision": "yes"}'),
                                        ("--config", '{"features": [4, 4, 4, 4, 4, 4], "patch": [1, 16, 16]}'),
                                        ("--init", "hello")])
def test_train_refuses_a_bad_config_or_checkpoint(tmp_path, tiny_dataset, what, text):
    f = tmp_path / "given.json"
    f.write_text(text)
    res = run(["train", "segmenter", "--data", tiny_dataset, "--out", tmp_path / "run", what, f, "--steps", "1"])
    assert "given.json" in error_line(res)


def test_synth_refuses_label_maps_that_are_not_label_maps(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    save_nifti(labels / "mr.nii.gz", smooth_volume((40, 40, 12)))  # an MR image given by mistake
    res = run(["synth", tmp_path / "ds", "--from-labels", labels, "-j", "1"], inputs=[labels])
    assert "not a label map" in error_line(res) and not (tmp_path / "ds").exists()
    (labels / "mr.nii.gz").write_text("not nifti")
    res = run(["synth", tmp_path / "ds", "--from-labels", labels, "-j", "1"], inputs=[labels])
    assert "mr.nii.gz" in error_line(res) and not (tmp_path / "ds").exists()


def _interrupt_synth(tmp_path, out, *args):
    # The child gets SIGINT's default action back: a suite started as a background job of a
    # non-interactive shell (`nohup ... &`) passes SIGINT on ignored, and Python then never
    # raises KeyboardInterrupt, so synth would run to the end.
    p = subprocess.Popen([sys.executable, "-m", "bmltrt", "synth", str(out), "--cases", "12", "-j", "2", *args],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    staged = f".{out.name}.synth-partial-*/**/*.nii.gz"  # the dataset is made beside -o, then moved in
    while time.time() < deadline and not any(out.parent.glob(staged)):  # until the first case is written
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and [ln for ln in err.splitlines() if ln.startswith("error:")], err
    assert not list(out.parent.glob(f".{out.name}.synth-partial-*"))


def test_interrupted_synth_leaves_no_dataset_and_an_earlier_one_whole(tmp_path):
    out = tmp_path / "ds"
    _interrupt_synth(tmp_path, out)
    assert not out.exists()
    # --force over an earlier dataset: interrupted, the earlier one is still all there
    run(["synth", out, "--cases", "3", "--seed", "5", "-j", "1"], code=0)
    before = digest([out])
    _interrupt_synth(tmp_path, out, "--seed", "6", "--force")
    assert digest([out]) == before and (out / "dataset.json").exists()


def test_synth_force_never_replaces_a_users_files(tmp_path):
    """--force replaces train/, val/ and test/ whole: a file of the user's in one of them was
    deleted with it."""
    out = tmp_path / "ds"
    run(["synth", out, "--cases", "3", "--seed", "5", "-j", "1"], code=0)
    mine = out / "val" / "images" / "my_scan.txt"
    mine.write_text("precious")
    before = digest([out])
    line = error_line(run(["synth", out, "--cases", "3", "--seed", "6", "-j", "1", "--force"]))
    assert "--force would replace val/, which holds a file bmltrt did not write" in line and "my_scan.txt" in line
    assert digest([out]) == before
    mine.unlink()
    (out / "notes.txt").write_text("mine")  # beside the splits: kept
    run(["synth", out, "--cases", "3", "--seed", "6", "-j", "1", "--force"], code=0)
    assert (out / "notes.txt").read_text() == "mine"


def test_staging_stays_on_the_output_folders_filesystem(tmp_path, monkeypatch):
    """A rename across filesystems fails (EXDEV): with the output folder on another
    filesystem than its parent (a mount point), the staging folder goes inside it, and
    move_in refuses before anything old is removed."""
    import bmltrt.io.outputs as outputs

    out = tmp_path / "mnt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_stat = os.stat

    class Moved:
        def __init__(self, st):
            self.st = st

        def __getattr__(self, name):
            return self.st.st_dev + 1 if name == "st_dev" else getattr(self.st, name)

    monkeypatch.setattr(outputs.os, "stat", lambda p, *a, **k: Moved(real_stat(p, *a, **k))
                        if Path(p) == out else real_stat(p, *a, **k))
    assert outputs._stage_place(out, "synth").parent == out
    with outputs.folder_beside(out, "synth") as stage:
        assert stage.parent == out and stage.name.startswith(".synth-partial-")
    stage = tmp_path / ".elsewhere"
    stage.mkdir()
    (stage / "old.txt").write_text("new")
    from bmltrt.errors import BmlError

    with pytest.raises(BmlError, match="another filesystem"):
        outputs.move_in(stage, out, last="old.txt", drop_first=["old.txt"])
    assert (out / "old.txt").read_text() == "old"


def test_staging_folders_of_killed_runs_are_removed(tmp_path):
    from bmltrt.io.outputs import folder_beside

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".ds.synth-partial-{int(dead.stdout)}"
    (left / "train").mkdir(parents=True)
    alive = tmp_path / f".ds.synth-partial-{os.getppid()}"  # a live process's: kept
    alive.mkdir()
    with folder_beside(tmp_path / "ds", "synth"):
        pass
    assert not left.exists() and alive.exists()


def test_models_labels_never_name_paths(tmp_path):
    from bmltrt.errors import BmlError
    from bmltrt.evaluation.evaluate import parse_models

    for label in ("a/b", "../../x", ".hidden", "a\\b", "tab\there"):
        with pytest.raises(BmlError, match="cannot name files"):
            parse_models([f"{label}={REPO / 'export'}"])
    assert parse_models([f"my models={REPO / 'export'}"])[0][0] == "my models"


@pytest.mark.skipif(not has_torch(), reason="export needs torch")
def test_export_checks_its_numbers_and_an_interrupted_export_leaves_the_folder_alone(tmp_path):
    for opt, val in (("--calibration-cases", "-1"), ("--fp16-bound", "nan")):
        res = run(["export", "--from-onnx", REPO / "export", "-o", tmp_path / "m", opt, val])
        assert opt in error_line(res) and not (tmp_path / "m").exists()
    p = subprocess.Popen([sys.executable, "-m", "bmltrt", "export", "--from-onnx", str(REPO / "export"), "-o",
                          str(tmp_path / "m"), "--no-lint"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(tmp_path.glob(".m.export-partial-*/*.onnx")):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert sorted(x.name for x in tmp_path.iterdir()) == [], err  # no models folder, no staging folder


def test_a_malformed_manifest_or_missing_models_folder_is_one_line(tmp_path, phantom_case):
    scan, _ = phantom_case
    m = tmp_path / "m"
    m.mkdir()
    (m / "manifest.json").write_text('{"format": "bmltrt-models-2", "models": {"segmenter": "x"}}')
    assert "not a bmltrt models manifest" in error_line(run(["detect", scan, "-o", tmp_path / "o", "--models", m]))
    assert "models folder not found" in error_line(run(["detect", scan, "-o", tmp_path / "o", "--models",
                                                            tmp_path / "nope"]))


def test_bad_environment_variables_are_one_line_naming_the_variable(tmp_path, phantom_case, monkeypatch):
    scan, _ = phantom_case
    for value in ("abc", "-3", "2000", "1.5", "\u0662", "1_0"):
        monkeypatch.setenv("BMLTRT_THREADS", value)
        line = error_line(run(["detect", scan, "-o", tmp_path / "o"], inputs=[scan]))
        assert f"BMLTRT_THREADS={value!r} is not a thread count" in line, line
    assert not (tmp_path / "o").exists()
    monkeypatch.delenv("BMLTRT_THREADS")
    monkeypatch.setenv("BMLTRT_MODELS", str(tmp_path / "nope"))
    line = error_line(run(["detect", scan, "-o", tmp_path / "o"], inputs=[scan]))
    assert "models folder not found (from $BMLTRT_MODELS)" in line and "nope" in line, line


@pytest.mark.skipif(not has_torch(), reason="export-check needs torch")
def test_export_check_refuses_a_split_the_dataset_lacks(tmp_path, tiny_dataset):
    res = run(["export-check", REPO / "export", "--data", tiny_dataset, "--split", "bogus", "-o", tmp_path / "x"])
    assert "bogus" in error_line(res)
    # every asked resolution against the folder before the first one is computed (minutes)
    t0 = time.time()
    res = run(["export-check", REPO / "export", "--data", tiny_dataset, "--resolutions", "128,1000", "-o", tmp_path / "x"])
    assert "no inpainter for resolution 1000" in error_line(res) and time.time() - t0 < 30
    assert not (tmp_path / "x").exists()


def test_evaluate_verifies_the_models_before_any_cached_map_is_used(tmp_path):
    """With a warm map cache no network ran, so a corrupt models folder went unnoticed."""
    from bmltrt.errors import BmlError
    from bmltrt.evaluation.evaluate import open_model_sets

    m = tmp_path / "m"
    m.mkdir()
    for f in (REPO / "export").iterdir():
        if f.is_file():
            (m / f.name).symlink_to(f)
    (m / "segmenter.onnx").unlink()
    b = bytearray((REPO / "export" / "segmenter.onnx").read_bytes())
    b[-100] ^= 0xFF
    (m / "segmenter.onnx").write_bytes(bytes(b))
    with pytest.raises(BmlError, match="does not match the sha256"):
        open_model_sets([f"x={m}"], [256], "onnxruntime", "cpu")


def test_a_long_but_legal_scan_name_is_written(tmp_path):
    """A 240-character name: its outputs fit in 255 bytes, the staging folder's name did not."""
    from bmltrt.io.outputs import write_output_set

    outs = OutputSet(tmp_path, "k" * 240)
    write_output_set(outs, _writers())
    assert listing(tmp_path) == sorted(f"{'k' * 240}{e}" for e in OUTPUT_NAMES)


# ---- the re-check's leftovers (session 2026-12-06) ----------------------------------------

@pytest.mark.parametrize("form", [["detect", "{scan}", "-o", ""], ["detect", "{scan}", "--out="],
                                  ["detect", "{scan}", "-o", "  "], ["synth", ""], ["evaluate", "run", "", "-o", "x"],
                                  ["detect", "{scan}", "-o", "x", "--models", ""],
                                  ["evaluate", "{scan}", "-o", "x", "--resolutions", ""]],
                         ids=["o_empty", "out_eq", "o_blank", "synth_empty", "evaluate_empty", "models_empty",
                              "resolutions_empty"])
def test_an_empty_path_or_value_is_not_the_current_folder(tmp_path, monkeypatch, form):
    scan = small_scan(tmp_path / "k.nii.gz")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    res = run([a.format(scan=scan) for a in form], inputs=[scan])
    assert "empty value" in error_line(res) or "empty path" in error_line(res)
    assert listing(cwd) == []


def test_a_short_option_with_an_equals_sign_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scan = small_scan(tmp_path / "k.nii.gz")
    assert "after a space (-o out)" in error_line(run(["detect", scan, "-o=out"], inputs=[scan]))
    assert listing(tmp_path) == ["k.nii.gz"]  # no folder named "=out"


@pytest.mark.parametrize("name, stem", [("..nii.gz", "scan"), (".nii.gz", "scan"), (".k.nii", "k"),
                                        ("..hidden.nii.gz", "hidden"), ("k.nii.gz", "k")])
def test_outputs_are_never_hidden_files(tmp_path, name, stem):
    from bmltrt.io.inputs import expand_inputs

    small_scan(tmp_path / name)
    found = expand_inputs([str(tmp_path / name)], None)
    assert [s.stem for s in found.sources] == [stem]


def test_a_file_given_as_the_models_or_engines_folder_is_refused(tmp_path):
    scan = small_scan(tmp_path / "k.nii.gz")
    f = tmp_path / "afile"
    f.write_text("x")
    assert "models path is a file" in error_line(run(["detect", scan, "-o", tmp_path / "o", "--models", f]))
    assert "engines path is a file" in error_line(run(["detect", scan, "-o", tmp_path / "o", "--engines", f]))
    assert not (tmp_path / "o").exists()


def test_engines_with_another_backend_is_said_to_be_ignored(tmp_path):
    scan = small_scan(tmp_path / "k.nii.gz")
    res = run(["detect", scan, "-o", tmp_path / "o", "--backend", "onnxruntime", "--engines", tmp_path], inputs=[scan])
    assert "--engines applies to the tensorrt backend" in res.stderr  # then the tiny scan is refused


def swapped_models(tmp_path) -> Path:
    """The shipped models with the 128 graph under the 256 name, its sha256 written in."""
    models = tmp_path / "models"
    shutil.copytree(REPO / "export", models)
    shutil.copy2(models / "inpainter_128.onnx", models / "inpainter_256.onnx")
    man = json.loads((models / "manifest.json").read_text())
    sha = hashlib.sha256((models / "inpainter_256.onnx").read_bytes()).hexdigest()
    entry = man["models"]["inpainter_256"]
    man["files"]["inpainter_256.onnx"] = entry["sha256"] = entry["precisions"]["fp32"]["sha256"] = sha
    (models / "manifest.json").write_text(json.dumps(man))
    return models


def test_a_graph_swapped_under_the_manifest_is_one_line(tmp_path, phantom_case):
    """A shape check at load, not an internal error (nor, in bench, skipped rows and exit 0)."""
    models = swapped_models(tmp_path)
    res = run(["bench", "--quick", "--models", models, "--backends", "onnxruntime", "-o", tmp_path / "b"])
    assert "inpainter_256" in error_line(res) and not (tmp_path / "b").exists()
    scan, _ = phantom_case
    res = run(["detect", scan, "-o", tmp_path / "o", "--models", models, "--resolution", "256"], inputs=[scan])
    line = error_line(res)
    assert "inpainter_256" in line and "[-1, 2, 128, 128]" in line and "internal error" not in line
    assert not (tmp_path / "o").exists()


def test_resolution_zero_is_not_the_default(tmp_path):
    scan = small_scan(tmp_path / "k.nii.gz")
    assert "no inpainter for --resolution 0" in error_line(run(["detect", scan, "-o", tmp_path / "o", "-r", "0"]))


def test_evaluate_and_bench_keep_earlier_results_without_overwrite(tmp_path, tiny_dataset):
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "evaluation.json").write_text("precious")
    (ev / "table1.md").write_text("mine")
    res = run(["evaluate", tiny_dataset, "-o", ev, "--limit", "1"], inputs=[ev])
    assert "earlier results" in error_line(res) and "--overwrite" in error_line(res)
    (ev / "tuning.json").write_text("old")
    assert "tuning.json" in error_line(run(["evaluate", "tune", tiny_dataset, "-o", ev], inputs=[ev]))
    b = tmp_path / "b"
    b.mkdir()
    (b / "bench.csv").write_text("old")
    assert "bench.csv" in error_line(run(["bench", "--quick", "-o", b], inputs=[b]))


def test_hidden_input_names_write_visible_outputs(tmp_path, phantom_case):
    """The stem must name the written files too, not only the checks before the work."""
    from bmltrt.io.inputs import expand_inputs

    scan = shutil.copy2(phantom_case[0], tmp_path / "..nii.gz")
    src = expand_inputs([str(scan)], None).sources[0]
    assert src.load().name == "scan"


def test_table_with_a_bad_readme_writes_nothing(tmp_path):
    ev = REPO / "benchmarks" / "results" / "oai_painted_test"
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    out = tmp_path / "t"
    res = run(["evaluate", "table", ev, "-o", out, "--readme", readme], inputs=[readme])
    assert "markers" in error_line(res) and listing(out) == []
    res = run(["evaluate", "table", ev, "-o", out, "--readme", tmp_path / "missing.md"])
    assert "no such file" in error_line(res) and listing(out) == []


def test_table_overwrite_leaves_one_runs_results(tmp_path):
    """`evaluate table --overwrite` into a folder of an earlier table with more data sets:
    the earlier run's extra table and figure go, the user's other files stay."""
    ev = REPO / "benchmarks" / "results" / "oai_painted_test"
    out = tmp_path / "t"
    out.mkdir()
    for name in ("table1_1.csv", "table1_2.csv", "figure3_2.png", "report.md", "notes.txt"):
        (out / name).write_text("earlier")
    res = run(["evaluate", "table", ev, "-o", out], code=2)
    assert "earlier results" in error_line(res) and (out / "table1_2.csv").read_text() == "earlier"
    res = run(["evaluate", "table", ev, "-o", out, "--overwrite"], code=0)
    assert "removed table1_2.csv" in res.stdout
    names = listing(out)
    assert "table1_2.csv" not in names and "figure3_2.png" not in names and "notes.txt" in names
    assert (out / "table1_1.csv").read_text().startswith("data,split,")
    assert (out / "report.md").read_text() != "earlier"
    # names that only look like ours are the user's; an input is never removed or replaced
    for name in ("table1_backup.csv", "table1_02.csv", "figure3_final.png"):
        (out / name).write_text("mine")
    shutil.copy(ev / "evaluation.json", out / "table1_7.csv")
    res = run(["evaluate", "table", ev, out / "table1_7.csv", "-o", out, "--overwrite"], code=0)
    assert all((out / n).read_text() == "mine" for n in ("table1_backup.csv", "table1_02.csv", "figure3_final.png"))
    assert (out / "table1_7.csv").read_bytes() == (ev / "evaluation.json").read_bytes()
    shutil.copy(ev / "evaluation.json", out / "table1_2.csv")
    res = run(["evaluate", "table", ev, out / "table1_2.csv", "-o", out, "--overwrite"], inputs=[out / "table1_2.csv"])
    assert "input of this command would be overwritten" in error_line(res)


def test_control_characters_in_names_are_shown_not_sent(tmp_path, phantom_case):
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy2(phantom_case[0], d / ".k\x1b[31mRED.nii.gz")
    line = error_line(run(["detect", d, "-o", tmp_path / "o"], inputs=[d]))
    assert "\x1b" not in line and "\\x1b[31mRED" in line
    assert "takes no value" in error_line(run(["detect", d, "-o", tmp_path / "o", "--no-mirror="]))


def test_a_pattern_that_names_hidden_scans_runs_them(tmp_path, phantom_case):
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy2(phantom_case[0], d / ".k.nii.gz")
    (d / ".notes.txt").write_text("not a scan")
    run(["detect", str(d / ".k*"), "-o", tmp_path / "o"], inputs=[d / ".k.nii.gz"], code=0)
    assert "k_report.json" in listing(tmp_path / "o")


def test_a_termination_whose_exception_was_lost_still_stops_the_commit(tmp_path):
    """A SIGTERM handler that ran inside C code which cleared its exception (seen in a cold
    export, during a lazy import) must not let the command commit its outputs."""
    from bmltrt.errors import TERMINATION_REQUESTS, Interrupted, raise_interrupted
    from bmltrt.io.outputs import signals_held

    TERMINATION_REQUESTS.clear()
    try:
        raise_interrupted(signal.SIGTERM, None)
    except Interrupted:
        pass  # swallowed, as that C code did
    with pytest.raises(Interrupted):
        with signals_held():
            (tmp_path / "committed").write_text("x")
    assert not (tmp_path / "committed").exists()
    TERMINATION_REQUESTS.clear()
    with signals_held():  # no termination: the commit goes on
        (tmp_path / "committed").write_text("x")
    assert (tmp_path / "committed").exists()


# ---- header oddities: the line says what is really wrong (hostile tester 5) -------------------

def test_misnamed_and_two_file_images_say_what_they_are(tmp_path):
    from bmltrt.errors import BmlError
    from bmltrt.io import load_scan

    plain = small_scan(tmp_path / "k.nii")
    fake_gz = tmp_path / "fake.nii.gz"
    shutil.copy2(plain, fake_gz)  # uncompressed bytes under a .gz name
    with pytest.raises(BmlError, match="named .gz but not gzip-compressed") as e:
        load_scan(fake_gz)
    assert "rename it to .nii" in e.value.line()
    nib.save(nib.Nifti1Pair(smooth_volume((10, 24, 24)), np.diag([3.0, 0.5, 0.5, 1])), str(tmp_path / "pair.hdr"))
    for name in ("pair.hdr", "pair.img"):
        with pytest.raises(BmlError, match="two-file image") as e:
            load_scan(tmp_path / name)
        assert "one .nii.gz" in e.value.line()


def test_lengths_in_microns_and_one_bad_voxel_are_said_plainly(tmp_path):
    from bmltrt.errors import BmlError
    from bmltrt.io import load_scan

    img = nib.Nifti1Image(smooth_volume((10, 24, 24)), np.diag([3000.0, 500.0, 500.0, 1]))
    img.header.set_xyzt_units("micron", "sec")
    nib.save(img, str(tmp_path / "um.nii.gz"))
    with pytest.raises(BmlError, match="lengths in microns") as e:
        load_scan(tmp_path / "um.nii.gz")
    assert "millimetres" in e.value.line()
    vol = smooth_volume((10, 24, 24))
    vol[3, 4, 5] = np.nan
    save_nifti(tmp_path / "nan.nii.gz", vol, np.diag([3.0, 0.5, 0.5, 1.0]))
    with pytest.raises(BmlError, match="^1 voxel is NaN or Inf"):
        load_scan(tmp_path / "nan.nii.gz")


def test_a_header_whose_qform_and_sform_disagree_is_warned_about(tmp_path):
    from bmltrt.io import load_scan

    aff = np.diag([3.0, 0.5, 0.5, 1.0])
    img = nib.Nifti1Image(smooth_volume((10, 24, 24)), aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    nib.save(img, str(tmp_path / "same.nii.gz"))
    assert not any("qform" in w for w in load_scan(tmp_path / "same.nii.gz").warnings)
    flipped = aff.copy()
    flipped[0] *= -1  # left-right
    img.set_qform(flipped, code=1)
    nib.save(img, str(tmp_path / "flip.nii.gz"))
    w = [w for w in load_scan(tmp_path / "flip.nii.gz").warnings if "qform" in w]
    assert len(w) == 1 and "LAS against RAS" in w[0] and "the sform was used" in w[0], w
    shifted = aff.copy()
    shifted[:3, 3] += 10.0
    img.set_qform(shifted, code=1)
    nib.save(img, str(tmp_path / "shift.nii.gz"))
    assert any("by up to 10.0 mm" in w for w in load_scan(tmp_path / "shift.nii.gz").warnings)


def test_coarse_pixels_are_warned_about(tmp_path):
    from bmltrt.io import load_scan
    from bmltrt.io.knee_input import check_knee_input

    vol = smooth_volume((12, 24, 24))
    coarse = load_scan(save_nifti(tmp_path / "coarse.nii.gz", vol, np.diag([3.0, 8.0, 8.0, 1.0])))
    assert any("in-plane pixels of 8.00 mm" in w for w in check_knee_input(coarse))
    fine = load_scan(save_nifti(tmp_path / "fine.nii.gz", smooth_volume((12, 160, 160)), np.diag([3.0, 0.5, 0.5, 1.0])))
    assert not any("in-plane" in w for w in check_knee_input(fine))


def test_masks_of_a_scan_with_zero_pixdim_get_the_sform_voxel_size(tmp_path):
    from bmltrt.io import load_scan
    from bmltrt.io.nifti import mask_image_like

    aff = np.array([[0, 0, 3.0, 0], [-0.357, 0, 0, 0], [0, -0.357, 0, 0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(smooth_volume((24, 24, 10)), aff)
    img.set_sform(aff, code=1)
    img.header.set_qform(None, code=0)
    nib.save(img, str(tmp_path / "zp.nii"))
    raw = bytearray((tmp_path / "zp.nii").read_bytes())
    raw[80:92] = np.zeros(3, "<f4").tobytes()  # pixdim[1:4] (nibabel writes 1s where given 0s)
    (tmp_path / "zp.nii").write_bytes(bytes(raw))
    scan = load_scan(tmp_path / "zp.nii")
    mask = mask_image_like(np.zeros(scan.data.shape, np.uint8), scan)
    assert np.allclose(mask.header["pixdim"][1:4], [0.357, 0.357, 3.0], atol=1e-5)
    assert np.allclose(mask.header.get_sform(), aff) and int(mask.header["sform_code"]) == 1


def test_a_misplaced_dicom_slice_is_not_called_missing(tmp_path):
    import pydicom

    d = write_dicom_series(tmp_path / "moved", "1.2.3.4.3001", 8, n=8)
    f = sorted(d.glob("*.dcm"))[3]
    ds = pydicom.dcmread(str(f))
    ds.ImagePositionPatient = [3.0 * 3 + 0.5, 0, 0]  # half a millimetre off its place
    ds.save_as(f, enforce_file_format=True)
    line = error_line(run(["detect", d, "-o", tmp_path / "o"], inputs=[d]))
    assert "slices are misplaced or missing" in line, line


def test_tuning_on_a_val_split_without_lesions_is_refused(tmp_path, tiny_dataset, monkeypatch):
    """Every setting that calls nothing scores Dice 1.0 there: `tune --save` wrote such a
    "tuned" setting into the models folder."""
    from types import SimpleNamespace

    import bmltrt.evaluation.evaluate as evaluate

    healthy = SimpleNamespace(lesion=np.zeros((4, 8, 8), bool))  # the val split's truths, as loaded
    monkeypatch.setattr(evaluate, "compute_split", lambda *a, **k: SimpleNamespace(cases=["k"], truths={"k": healthy}))
    models = tmp_path / "m"
    shutil.copytree(REPO / "export", models)
    before = digest([models])
    res = CliRunner().invoke(app, ["evaluate", "tune", str(tiny_dataset), "-o", str(tmp_path / "t"), "--resolutions",
                                   "128", "--no-baselines", "--search", "quick", "--models", str(models), "--save"])
    assert res.exit_code == 2 and "the val split holds no true lesion in its 1 case(s)" in res.stderr, res.stderr
    assert digest([models]) == before and not (tmp_path / "t").exists()


@pytest.mark.skipif(not has_torch(), reason="training needs torch")
def test_an_inpainter_graph_given_to_the_segmenter_is_named(tmp_path, tiny_dataset):
    res = run(["train", "segmenter", "--data", tiny_dataset, "--out", tmp_path / "run", "--init",
               REPO / "export" / "inpainter_128.onnx", "--steps", "1"])
    assert "this is an inpainter graph, not a segmenter's" in error_line(res) and not (tmp_path / "run").exists()


# ---- one parser for every --resolutions (session 2026-12-08) -----------------------------------

@pytest.mark.parametrize("text,expected", [(None, None), ("256", [256]), ("128, 448", [128, 448]),
                                           ("all", "all"), ("ALL", "all"), (" All", "all")])
def test_resolutions_parse(text, expected):
    from bmltrt.runtime.models import parse_resolutions

    assert parse_resolutions(text) == expected


@pytest.mark.parametrize("text,words", [("", "is empty"), ("128,,256", "empty item"), ("256,", "empty item"),
                                        ("2x6", "not a number"), ("all,256", "not a number"),
                                        ("256,256", "twice"), ("100", "multiple of 8"), ("4096", "multiple of 8"),
                                        ("-256", "multiple of 8")])
def test_resolutions_refused_in_one_line(text, words):
    from bmltrt.errors import BmlError
    from bmltrt.runtime.models import parse_resolutions

    with pytest.raises(BmlError, match=words):
        parse_resolutions(text, "--resolutions")


def _one_voxel(v, value):
    v[10, 100, 100] = value
    return v


@pytest.mark.parametrize("make,words", [
    (lambda v: _one_voxel(v.astype(np.float32), 1.5), "holds 1.5, not a whole-number"),
    (lambda v: _one_voxel(v.astype(np.float32), np.nan), "holds nan"),
    (lambda v: _one_voxel(v.astype(np.float32), np.inf), "holds inf"),
    (lambda v: _one_voxel(v.astype(np.int16), -1), "holds -1, not a label (0-255)"),
    (lambda v: _one_voxel(v.astype(np.float32), 1e9), "holds 1e+09, not a label"),
    (lambda v: np.pad(np.ones((2, 2, 2), np.uint8), 4), "only 15 mm³"),  # 8 voxels of 3 x 0.8 x 0.8 mm
])
def test_synth_names_what_is_wrong_with_a_label_map(tmp_path, make, words):
    labels = tmp_path / "labels"
    labels.mkdir()
    v = np.zeros((30, 200, 200), np.uint8)
    v[5:25, 40:160, 40:160] = 1
    v[1, 1, 1] = 3
    save_nifti(labels / "k.nii.gz", make(v), np.diag([3.0, 0.8, 0.8, 1.0]))
    res = run(["synth", tmp_path / "ds", "--from-labels", labels, "-j", "1"], inputs=[labels])
    line = error_line(res)
    assert words in line and "k.nii.gz" in line and not (tmp_path / "ds").exists()
    assert "Warning" not in res.stderr, res.stderr  # one line, no numpy warning before it
