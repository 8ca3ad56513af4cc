"""A stand-in `tensorrt` module for the CPU tests of `bmltrt build-engines`.

It implements only the builder API that bmltrt.runtime.trt_build calls (names and
signatures as in TensorRT 10.3 and 11.x's Python bindings) and records what it was
asked, so the tests see the flags, profiles, pool limit, optimisation level, timing cache
and progress monitor that a real build would get. It builds nothing: the "plan" is a
JSON description of the request. Real builds are checked by scripts/gpu_check.sh.
"""

from __future__ import annotations

import json
import types


def make(version: str = "10.8.0.43", fail_parse: bool = False, fail_build: bool = False) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []  # (what, details) of every build

    class Logger:
        WARNING = 2

        def __init__(self, severity=None):
            self.severity = severity

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class IProgressMonitor:
        def __init__(self):
            pass

    class _Tensor:
        def __init__(self, name):
            self.name = name

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return _Tensor(self.inputs[i])

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.errors = []

        def parse_from_file(self, path):
            if fail_parse:
                self.errors = ["In node 7 (Foo): UNSUPPORTED_NODE: No importer registered for op: Foo"]
                return False
            from bmltrt.runtime.specs import graph_io

            ins, _ = graph_io(path)
            self.network.inputs = [n for n, _ in ins]
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, opt, mx):
            self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data

    class Config:
        def __init__(self):
            self.pools = {}
            self.builder_optimization_level = 3
            self.profiles = []
            self.cache = None
            self.progress_monitor = None

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return TimingCache(self.cache.data + b"+")  # one more entry per build

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            mon = config.progress_monitor
            if mon is not None:
                mon.phase_start("Building engine", None, 2)
                for i in range(2):
                    mon.step_complete("Building engine", i)
                mon.phase_finish("Building engine")
            details = {"flags": network.flags, "inputs": network.inputs,
                       "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
                       "opt_level": config.builder_optimization_level,
                       "profiles": [{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in config.profiles],
                       "timing_cache_in": len(config.cache.data) if config.cache else None}
            trt.calls.append(details)
            if fail_build:
                return None
            return json.dumps(details).encode()

    for name, obj in list(locals().items()):
        if isinstance(obj, type):
            setattr(trt, name, obj)
    return trt
