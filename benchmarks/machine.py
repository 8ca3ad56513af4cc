"""Who measured: see bmltrt.bench.machine (kept here for the older benchmark scripts)."""

from bmltrt.bench.machine import machine_info  # noqa: F401
