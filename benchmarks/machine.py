"""Who measured: the machine and software a benchmark figure belongs to."""

from __future__ import annotations

import datetime
import os
import platform


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "system": f"{platform.system()} {platform.machine()}"}
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    import numpy
    info["numpy"] = numpy.__version__
    return info
