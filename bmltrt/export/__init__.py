"""torch -> ONNX: the one place where exported graphs are made and checked.

Now: float32 graphs with the DFT-as-matrix-product FourierUnit, sha256 in a manifest.
Grows into: FP16 graphs with float32 islands, TensorRT op checks, per-resolution sets.
"""
