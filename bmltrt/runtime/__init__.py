"""Inference: backends behind one small interface, preprocessing, sliding window."""
