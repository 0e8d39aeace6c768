"""``timm:<model-name>``: any timm model, its preprocessing read from its ``pretrained_cfg``.

The embedding is the model's pooled pre-logits features (``num_classes=0``).
Preprocessing resolves as in timm (caller, then model config, then
defaults): ``timm.data.resolve_model_data_config(model)`` gives input size,
interpolation, crop fraction, crop mode, mean and std, and
`preprocess_from_timm_cfg` turns it into a `Preprocess` that reproduces
timm's eval transforms (torchvision ``Resize`` + ``CenterCrop`` on PIL images:
``floor(size / crop_pct)``, round-half-even crop offsets).

Weights: ``weights=`` a file (``.safetensors``/``.pth``) or a folder holding
one; else the model's hub repository (``timm/<name>``) from
``$VISMEM_WEIGHTS_DIR`` or the hub cache, downloading unless offline.

timm imports torchvision; where torchvision cannot be imported (PyPI's CUDA
build beside a CPU-only torch), building a ``timm:`` encoder raises an
`EncoderError` that says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import EncoderError
from . import register_encoder, register_scheme
from .base import Encoder, EncoderSpec, Preprocess
from .runtime import TorchForward
from .weights import local_hf_folder, missing_weights_error, resolve_hf_folder, weights_identity

log = logging.getLogger(__name__)

_CROP_MODES = ("center", "squash")


def preprocess_from_timm_cfg(cfg: dict) -> Preprocess:
    """Translate a resolved timm data config into a `Preprocess`.

    Parameters
    ----------
    cfg : dict
        As returned by ``timm.data.resolve_model_data_config``: ``input_size``
        (C, H, W), ``interpolation``, ``mean``, ``std``, ``crop_pct`` and
        optionally ``crop_mode``.

    Raises
    ------
    EncoderError
        For settings `Preprocess` cannot reproduce (non-square input,
        ``crop_mode="border"``, squash with a crop).

    >>> preprocess_from_timm_cfg({"input_size": (3, 224, 224), "interpolation": "bicubic",
    ...     "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9}).resize_size
    248
    """
    _, h, w = cfg["input_size"]
    if h != w:
        raise EncoderError(f"timm config: only square inputs are supported; got input_size={cfg['input_size']}")
    crop_mode = cfg.get("crop_mode") or "center"
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    if crop_mode not in _CROP_MODES:
        raise EncoderError(f"timm config: crop_mode={crop_mode!r} is not supported (use one of {_CROP_MODES})")
    if crop_mode == "squash" and crop_pct != 1.0:
        raise EncoderError(f"timm config: crop_mode='squash' needs crop_pct=1.0; got {crop_pct}")
    interpolation = cfg.get("interpolation") or "bilinear"
    return Preprocess(
        input_size=int(h),
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=tuple(float(x) for x in cfg["mean"]),
        std=tuple(float(x) for x in cfg["std"]),
        resize_mode="squash" if crop_mode == "squash" else "shorter",
        crop_offset="round",
    )


def import_timm():
    """``timm``, or an `EncoderError` saying why it cannot be imported."""
    try:
        import timm
        import timm.data  # noqa: F401
    except Exception as exc:  # ImportError, or torchvision's RuntimeError for a mismatched build
        hint = ""
        if "torchvision" in f"{type(exc).__name__} {exc}" or "nms" in str(exc):
            hint = (" timm needs a torchvision that matches the installed torch (here torchvision cannot be "
                    "imported beside this torch build); install a matching pair, e.g. both from "
                    "PyTorch's CPU wheel index")
        raise EncoderError(f"timm encoders need timm and torchvision: `pip install 'visual-memory[timm]'` "
                           f"({type(exc).__name__}: {str(exc)[:160]}).{hint}") from exc
    return timm


def _weights_file(name: str, model_name: str, timm, weights) -> Path:
    if weights is not None:
        path = Path(os.fspath(weights)).expanduser()
        if path.is_dir():
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) or sorted(path.glob("*.pth"))
            if not files:
                raise EncoderError(f"{path}: no weights file (*.safetensors, *.bin, *.pth) for encoder {name!r}")
            return files[0]
        if path.is_file():
            return path
        if "/" not in os.fspath(weights):
            raise EncoderError(f"weights for encoder {name!r}: {path} does not exist")
    cfg = timm.models.get_pretrained_cfg(model_name)
    repo = os.fspath(weights) if weights is not None else getattr(cfg, "hf_hub_id", None) if cfg else None
    if not repo:
        raise EncoderError(f"timm model {model_name!r} has no hub weights; pass weights=<file> for encoder {name!r}")
    if repo.endswith("/"):  # timm's shorthand 'timm/' means 'timm/<model_name>'
        repo = repo + model_name
    folder = resolve_hf_folder(name, repo)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model.bin"))
    if not files:
        raise missing_weights_error(name, repo, f"{folder} holds no weights file")
    return files[0]


class TimmEncoder(Encoder):
    """A timm model's pooled features.

    Parameters
    ----------
    model_name : str
        A timm model name with optional pretrained tag (``"vit_small_patch16_224.augreg_in21k_ft_in1k"``).
    weights : str or PathLike, optional
        A weights file or a folder holding one, or a hub repository id;
        default: the model's hub repository (local folder or cache first).
    name : str, optional
        The encoder's name in the spec; default ``"timm:<model_name>"``.
    device : str, default "auto"
    batch_size : int, default 32
    """

    def __init__(self, model_name: str, *, weights=None, name: Optional[str] = None, device: str = "auto",
                 batch_size: int = 32, backend: str = "torch") -> None:
        name = name or f"timm:{model_name}"
        if backend not in ("auto", "torch"):
            raise EncoderError(f"timm encoders run on torch (export with `vismem export-onnx`); got backend={backend!r}")
        timm = import_timm()
        if model_name.split(".")[0] not in timm.list_models(model_name.split(".")[0]):
            raise EncoderError(f"unknown timm model {model_name!r}; see timm.list_models()")
        path = _weights_file(name, model_name, timm, weights)
        try:
            model = timm.create_model(model_name, pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay={"file": str(path)})
        except Exception as exc:
            raise EncoderError(f"{path}: timm cannot load weights for {model_name!r} ({type(exc).__name__}: {exc})") from exc
        pre = preprocess_from_timm_cfg(timm.data.resolve_model_data_config(model))
        self.batch_size = batch_size
        self._forward = TorchForward(model, device=device, channels_last=True)
        dim = int(getattr(model, "num_features", 0)) or int(self._forward(np.zeros((1, 3, pre.input_size, pre.input_size), np.float32)).shape[1])
        self.spec = EncoderSpec(name=name, dim=dim, preprocess=pre, weights=weights_identity([path]),
                                source=f"timm:{model_name}", extra={"file": str(path)})


@register_scheme("timm")
def _make_timm(target: str, **kwargs) -> TimmEncoder:
    if not target:
        raise EncoderError("timm: needs a model name, e.g. timm:vit_small_patch16_224.augreg_in21k_ft_in1k")
    return TimmEncoder(target, **kwargs)


_VIT_S16 = "vit_small_patch16_224.augreg_in21k_ft_in1k"


@register_encoder(
    "vit-s16-augreg",
    dim=384,
    input_size=224,
    source=f"timm:{_VIT_S16}",
    description="ViT-S/16 AugReg (ImageNet-21k, fine-tuned on 1k) via timm; pooled features",
    available=lambda: local_hf_folder(f"timm/{_VIT_S16}") is not None,
)
def _make_vit_s16(**kwargs) -> TimmEncoder:
    return TimmEncoder(_VIT_S16, name="vit-s16-augreg", **kwargs)


__all__ = ["TimmEncoder", "import_timm", "preprocess_from_timm_cfg"]
