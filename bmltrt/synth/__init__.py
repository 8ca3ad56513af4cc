"""Knee phantoms with exact femur and lesion ground truth (the OAI data is not available)."""

from bmltrt.synth.phantom import PhantomConfig, Phantom, make_phantom  # noqa: F401
