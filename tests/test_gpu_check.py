"""scripts/gpu_check.sh on a CPU (--dry-run): the script, the GPU-test step (it skips), and
the parity and timing code of scripts/gpu_check.py run with numpy."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_on_a_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_ARGS": "--cases 1 --runs 1 --warmup 0 --slices 14 --resolution 128",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "out"), "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].endswith("PASSED")
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert res["passed"] and res["mode"].startswith("cpu") and res["device"] == "cpu" and res["date"]
    row = res["configurations"]["onnxruntime-cpu-static"]
    assert row["parity"]["pass"] and row["parity"]["cases"][0]["identical"]
    med = row["timings"]["median_ms"]
    assert {"upload_ms", "femur_ms", "inpaint_ms", "postprocess_ms", "download_ms", "total_ms"} <= set(med)
    assert row["timings"]["shape"] == [14, 448, 448]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "GPU tests" in log and "TensorRT not installed" in log
