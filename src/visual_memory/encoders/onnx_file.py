"""``onnx:<file>``: run an exported encoder through ONNX Runtime; `export_encoder` writes one.

`export_encoder` (``vismem export-onnx ENCODER OUT.onnx``) traces any
torch-backed encoder and stores its `EncoderSpec` as JSON in the model's
metadata, so ``onnx:OUT.onnx`` is the *same* encoder (same name, weights
identity, preprocessing and fingerprint): a memory built with
``dinov2-small`` accepts queries embedded by its ONNX export. Embeddings
agree with torch to cosine >= 0.999 (tested on CIFAR-10 photos).

An ONNX file without that metadata gets ``name="onnx:<file name>"``, the
file's SHA-256 as weights identity, and the preprocessing passed as
``preprocess=`` (default: ImageNet mean/std, 224, crop 0.875, bicubic).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import EncoderError
from . import register_scheme
from .base import Encoder, EncoderSpec, Preprocess
from .runtime import OnnxForward, export_onnx
from .weights import weights_identity

log = logging.getLogger(__name__)

SPEC_KEY = "visual_memory.encoder_spec"


class OnnxFileEncoder(Encoder):
    """An encoder whose network is an ONNX file.

    Parameters
    ----------
    path : str or PathLike
        The ``.onnx`` file: input float32 (B, 3, S, S), output (B, dim).
    preprocess : Preprocess, optional
        Overrides the preprocessing stored in the file (which changes the
        fingerprint); required in spirit for files not written by
        `export_encoder`, which otherwise get ImageNet defaults.
    threads : int, optional
        ONNX Runtime intra-op threads; default all cores.
    batch_size : int, default 64
    """

    backend = "onnx"

    def __init__(self, path, *, preprocess: Optional[Preprocess] = None, threads: Optional[int] = None,
                 batch_size: int = 64) -> None:
        path = Path(os.fspath(path)).expanduser()
        if not path.is_file():
            raise EncoderError(f"onnx:{path}: no such file (write one with `vismem export-onnx ENCODER {path}`)")
        self._forward = OnnxForward(path, threads=threads)
        self.batch_size = batch_size
        stored = self._forward.metadata.get(SPEC_KEY)
        if stored:
            try:
                spec = EncoderSpec.from_dict(json.loads(stored))
            except (ValueError, KeyError, TypeError) as exc:
                raise EncoderError(f"{path}: the encoder spec in its metadata is unreadable ({exc})") from exc
            if preprocess is not None and preprocess != spec.preprocess:
                spec = EncoderSpec(spec.name, spec.dim, preprocess, spec.weights, spec.source, dict(spec.extra))
        else:
            if preprocess is None:
                log.warning("%s carries no visual-memory spec; assuming ImageNet preprocessing (pass preprocess=)", path)
            pre = preprocess or Preprocess()
            out = self._forward(np.zeros((1, 3, pre.input_size, pre.input_size), np.float32))
            spec = EncoderSpec(name=f"onnx:{path.name}", dim=int(out.shape[1]), preprocess=pre,
                               weights=weights_identity([path]), source=f"onnx:{path}")
        shape = self._forward.session.get_inputs()[0].shape
        fixed = [d for d in shape[2:] if isinstance(d, int)]
        if fixed and any(d != spec.preprocess.input_size for d in fixed):
            raise EncoderError(f"{path}: the graph takes {shape[2:]} pixels but the preprocessing gives "
                               f"{spec.preprocess.input_size}x{spec.preprocess.input_size}")
        self.spec = spec
        self.path = path


@register_scheme("onnx")
def _make_onnx(target: str, **kwargs) -> OnnxFileEncoder:
    if not target:
        raise EncoderError("onnx: needs a file, e.g. onnx:/path/to/encoder.onnx")
    return OnnxFileEncoder(target, **kwargs)


def torch_module_of(encoder: Encoder):
    """The torch module behind an encoder built with ``backend="torch"``, or an `EncoderError`."""
    module = getattr(getattr(encoder, "_forward", None), "module", None)
    if module is None:
        raise EncoderError(f"encoder {encoder.name!r} has no torch module to export (backend {encoder.backend!r})")
    return module


def export_encoder(name: str, out, **kwargs) -> Path:
    """Export a torch-backed encoder to ONNX with its spec in the metadata.

    Parameters
    ----------
    name : str
        Any encoder name `create_encoder` accepts (``"dinov2-small"``, ``"hf:/dir"``, ...).
    out : str or PathLike
        The ``.onnx`` file to write (atomically).
    **kwargs
        Passed to `create_encoder` (e.g. ``weights=``); ``backend`` is forced to torch.

    Returns
    -------
    Path of the written file. Load it with ``create_encoder(f"onnx:{out}")``.
    """
    import torch

    from . import create_encoder

    if name.startswith("onnx:"):
        raise EncoderError(f"{name} is already an ONNX model")
    encoder = create_encoder(name, backend="torch", device="cpu", **kwargs)
    module = torch_module_of(encoder)
    module = module.to(memory_format=torch.contiguous_format)
    return export_onnx(module, Path(out), input_size=encoder.spec.preprocess.input_size,
                       metadata={SPEC_KEY: json.dumps(encoder.spec.to_dict())})
