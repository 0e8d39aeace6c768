"""Runtimes that execute an encoder's network: PyTorch or ONNX Runtime.

Each is a callable ``f(pixels: float32 (B,3,S,S)) -> float32 (B, dim)``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import EncoderError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where exported models live: ``$VISMEM_CACHE_DIR`` or ``~/.cache/visual-memory``."""
    root = os.environ.get("VISMEM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "visual-memory"
    )
    return Path(root)


def default_backend() -> str:
    """``onnx`` when onnxruntime imports (it is faster on CPU), else ``torch``."""
    if os.environ.get("VISMEM_BACKEND"):
        return os.environ["VISMEM_BACKEND"]
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnx"


def resolve_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class TorchForward:
    """Run a torch module in inference mode on the chosen device.

    Parameters
    ----------
    module : torch.nn.Module
        Maps float32 (B, 3, S, S) to (B, dim).
    device : str, default "auto"
        ``"auto"``: cuda, then Apple mps, then cpu (`resolve_device`).
    channels_last : bool, default True
        NHWC layout on CPU; measured 1.4x faster for depthwise-conv nets,
        irrelevant for ViTs (one patch convolution), so they pass False.
    """

    def __init__(self, module, *, device: str = "auto", channels_last: bool = True) -> None:
        import torch

        self.device = resolve_device(device)
        self.channels_last = channels_last and self.device == "cpu"
        self.module = module.eval().to(self.device)
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.module(x).float().cpu().numpy()


class OnnxForward:
    """Run an ONNX graph with onnxruntime (CPU, or CUDA when available)."""

    def __init__(self, path: Path, *, threads: int | None = None, spin: Optional[bool] = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EncoderError("onnxruntime is not installed: `pip install onnxruntime`") from exc
        if not Path(path).is_file():
            raise EncoderError(f"ONNX model not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if spin is None:
            spin = os.environ.get("VISMEM_ORT_SPIN", "0") == "1"
        # ORT's idle intra-op threads busy-wait for work by default, stealing
        # the cores from our decode threads (and from other processes): off,
        # efficientnet-lite0 measured faster both raw and end to end on a
        # loaded 2-core box (benchmarks/results/embed.json). VISMEM_ORT_SPIN=1 restores it.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:
            raise EncoderError(f"{path}: onnxruntime cannot load this model ({exc})") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.path = Path(path)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(pixels, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(pixels), -1)

    @classmethod
    def from_torch(cls, build_module: Callable[[], object], path: Path, *, input_size: int) -> "OnnxForward":
        """Load ``path``, exporting it from the torch module first if missing.

        The export is written to a temporary file and renamed into place, so
        concurrent processes never see a half-written model.
        """
        path = Path(path)
        if not path.is_file():
            export_onnx(build_module(), path, input_size=input_size)
        return cls(path)


def export_onnx(module, path: Path, *, input_size: int, metadata: Optional[dict[str, str]] = None) -> Path:
    """Export a torch module taking (B,3,S,S) to ONNX with a dynamic batch axis.

    Parameters
    ----------
    module : torch.nn.Module
    path : Path
        Written atomically (temporary file, then rename).
    input_size : int
        S, the square input side the graph is traced at.
    metadata : dict of str to str, optional
        Stored in the model's ``metadata_props`` (`vismem export-onnx` puts the
        encoder spec there, so ``onnx:<file>`` reproduces the preprocessing).
    """
    import warnings

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s to ONNX at %s", type(module).__name__, path)
    example = torch.zeros(1, 3, input_size, input_size)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                (example,),
                tmp,
                input_names=["pixels"],
                output_names=["features"],
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
    except Exception as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise EncoderError(f"cannot export {type(module).__name__} to ONNX ({type(exc).__name__}: {str(exc)[:300]})") from exc
    try:
        if metadata:
            import onnx

            model = onnx.load(tmp, load_external_data=False)
            for key, value in metadata.items():
                entry = model.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
