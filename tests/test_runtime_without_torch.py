"""The runtime must install and run without torch (a Jetson, a scanner workstation)."""

import subprocess
import sys

BLOCK = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'monai', 'tensorrt'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def _run(code):
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=300)


def test_import_and_help_without_torch():
    r = _run("import bmltrt, bmltrt.pipeline, bmltrt.runtime.backends, bmltrt.postprocess\n"
             "from typer.testing import CliRunner\nfrom bmltrt.cli import app\n"
             "res = CliRunner().invoke(app, ['--help'])\nassert res.exit_code == 0, res.output\n"
             "assert 'detect' in res.output\n"
             "assert 'torch' not in sys.modules\nprint('ok')")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_detect_runs_without_torch(phantom_case, tmp_path):
    scan, _ = phantom_case
    r = _run(f"from bmltrt.cli import app\nfrom typer.testing import CliRunner\n"
             f"res = CliRunner().invoke(app, ['detect', {str(scan)!r}, '-o', {str(tmp_path)!r}])\n"
             f"assert res.exit_code == 0, res.output + res.stderr\nassert 'torch' not in sys.modules\nprint('ok')")
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "knee_bml.nii.gz").exists()


def test_training_commands_say_torch_is_missing():
    r = _run("from typer.testing import CliRunner\nfrom bmltrt.cli import app\n"
             "res = CliRunner().invoke(app, ['train', 'segmenter', '--data', '.', '--out', '/tmp/x'])\n"
             "print(res.exit_code, res.stderr)")
    assert r.stdout.startswith("2 ") and "torch" in r.stdout
