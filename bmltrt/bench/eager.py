"""The networks as a researcher runs them: ``bmltrt.models`` in PyTorch eager float32.

The shipped folder holds ONNX graphs only, so the modules are built from the manifest's
recorded configs (as ``bmltrt export`` built them from the checkpoints) and take every
ONNX initializer whose name and shape match a parameter or buffer: all of the segmenter's,
and the inpainter's residual blocks; the exporter folded the BatchNorms of the
generator's stem, down- and up-sampling layers into their convolutions, so those layers
keep their random initialisation. Same architecture and shapes, hence the same work:
the timing is the point, not the output (``weights`` says what was loaded).

BatchNorm stays a separate op and the FourierUnit uses ``torch.fft`` (``fft="torch"``,
what training runs) or the DFT as matrix products (``fft="matmul"``, what the graphs hold).
"""

from __future__ import annotations

import numpy as np

from bmltrt.runtime.backends import BackendBase


def _load_matching(module, model_path) -> dict:
    """Copy the ONNX initializers that match the module's state by name and shape."""
    import onnx
    import torch
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx.load(str(model_path)).graph.initializer}
    state = module.state_dict()
    loaded = 0
    counted = [k for k in state if not k.endswith("num_batches_tracked")]
    with torch.no_grad():
        for k in counted:
            t = inits.get(k)
            if t is not None and tuple(t.dims) == tuple(state[k].shape):
                state[k].copy_(torch.from_numpy(numpy_helper.to_array(t).astype(np.float32)))
                loaded += 1
    module.load_state_dict(state)
    return {"loaded": loaded, "tensors": len(counted),
            "what": "ONNX initializers" if loaded == len(counted) else
                    f"{loaded}/{len(counted)} tensors from the ONNX initializers, the rest random-init"}


def build_module(store, name: str, fft: str = "torch"):
    """(eval torch module, weights record) of a network of the models folder."""
    entry = store.entry(name, "fp32")
    if entry["kind"] == "segmenter":
        from bmltrt.models.unetpp import SegmenterConfig, SegmenterLogits, build_segmenter

        mod = SegmenterLogits(build_segmenter(SegmenterConfig.from_dict(entry["config"])))
    else:
        from bmltrt.models.lama import InpainterConfig, LamaGenerator

        mod = LamaGenerator(InpainterConfig.from_dict(entry["config"]), fft_impl=fft)
    mod = mod.eval()
    weights = _load_matching(mod, store.path(name, "fp32"))
    return mod, weights


class EagerBackend(BackendBase):
    """A Backend (for the Detector) that runs the eager torch modules, float32, host arrays."""

    name = "torch-eager"

    def __init__(self, store, device: str = "cpu", fft: str = "torch", threads: int | None = None):
        import torch

        super().__init__(store, device, "fp32")
        self._torch = torch
        self.fft = fft
        self.tdev = torch.device("cuda" if device == "gpu" else "cpu")
        if threads:
            torch.set_num_threads(int(threads))
        self._modules: dict = {}
        self.weights: dict = {}

    def module(self, model: str):
        if model not in self._modules:
            mod, w = build_module(self.store, model, self.fft)
            self._modules[model] = mod.to(self.tdev)
            self.weights[model] = w
        return self._modules[model]

    def prepare(self, models) -> None:
        for m in models:
            self.module(m)

    def _run(self, model, spec, batch, out):
        torch = self._torch
        mod = self.module(model)
        with torch.inference_mode():
            y = mod(torch.as_tensor(np.ascontiguousarray(batch, np.float32), device=self.tdev))
            if self.tdev.type == "cuda":
                torch.cuda.synchronize()
            res = y.float().cpu().numpy()
        return self._deliver(res, out)

    def _release(self) -> None:
        self._modules.clear()
