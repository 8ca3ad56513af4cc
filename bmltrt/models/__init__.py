"""Torch networks (training and export only; the runtime never imports this)."""
