"""`bmltrt bench`: how fast, on which machine, side by side in one run.

- ``machine``  who measured: CPU/GPU, cores, library versions, date, git commit
- ``memory``   peak host memory (VmHWM, reset per measurement) and GPU peaks
- ``macs``     multiply-accumulates per slice counted from the ONNX graphs (roofline)
- ``eager``    the networks as a researcher runs them: bmltrt.models in PyTorch eager float32
- ``run``      the measurements: inpainter and segmenter throughput, stage latency of a scan,
               eager vs ours, torch.fft vs DFT matmul, fp16 vs fp32, scaling, 4 GiB check
- ``output``   JSON, CSV and PNG plots of a run; ``readme`` the README's performance section

Everything here runs without torch: rows that need it are skipped with a note.
"""
