"""The paper's encoders through Hugging Face ``transformers``: DINOv2, CLIP, SigLIP, ``hf:<repo-or-dir>``.

Named encoders (registered below) fix the preprocessing the paper used, in
`Preprocess` terms; the weights come from a local folder, ``$VISMEM_WEIGHTS_DIR``
or the hub cache (`visual_memory.encoders.weights`). What each returns:

- DINOv2 (``dinov2-*``, ``dinov2-*-reg``): the CLS token after the final
  layer norm (``Dinov2Model(...).pooler_output``), as in the paper;
- CLIP (``clip-vit-*``): the projected image embedding
  (``CLIPVisionModelWithProjection(...).image_embeds``), loadable from a full
  CLIP checkpoint;
- SigLIP (``siglip-base``): the attention-pooled image embedding
  (``SiglipVisionModel(...).pooler_output``, what ``get_image_features`` returns).

The generic ``hf:<repo-or-dir>`` reads the preprocessing from the folder's
``preprocessor_config.json`` (``preprocess=`` overrides it).

Preprocessing and the reference processors: ours equals the PIL image
processors of ``transformers`` (``BitImageProcessorPil`` for DINOv2,
``CLIPImageProcessorPil``, ``SiglipImageProcessorPil``) to float rounding
(tested on CIFAR-10 and scikit-image photos). When torchvision is installed,
``AutoImageProcessor`` picks the torchvision ("fast") variants instead, whose
tensor resize differs from PIL's by a few grey levels; the paper's pipelines
(the DINOv2 and CLIP repositories) resize PIL images, as we do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import EncoderError
from . import register_encoder, register_scheme
from .base import Encoder, EncoderSpec, Preprocess
from .runtime import OnnxForward, TorchForward, cache_dir, default_backend
from .weights import hf_weight_files, local_hf_folder, resolve_hf_folder, weights_identity

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The paper: shorter side 256 (bicubic, antialiased), centre crop 224, ImageNet mean/std.
DINOV2_PREPROCESS = Preprocess(input_size=224, crop_pct=224 / 256, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
# The paper: shorter side 224 (bicubic), centre crop 224, CLIP mean/std.
CLIP_PREPROCESS = Preprocess(input_size=224, crop_pct=1.0, interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD)
# google/siglip-*-224's processor: squash to 224x224 (bicubic), mean = std = 0.5.
SIGLIP_PREPROCESS = Preprocess(
    input_size=224, crop_pct=1.0, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode="squash"
)

# model_type in config.json -> (family, default preprocessing)
_FAMILIES = {
    "dinov2": ("dinov2", DINOV2_PREPROCESS),
    "dinov2_with_registers": ("dinov2", DINOV2_PREPROCESS),
    "clip": ("clip", CLIP_PREPROCESS),
    "clip_vision_model": ("clip", CLIP_PREPROCESS),
    "siglip": ("siglip", SIGLIP_PREPROCESS),
    "siglip_vision_model": ("siglip", SIGLIP_PREPROCESS),
}


@dataclass(frozen=True)
class HFModelCard:
    """A named encoder backed by a Hugging Face repository."""

    name: str
    repo: str
    dim: int
    family: str  # "dinov2" | "clip" | "siglip"
    preprocess: Preprocess
    description: str


CARDS = [
    HFModelCard("dinov2-small", "facebook/dinov2-small", 384, "dinov2", DINOV2_PREPROCESS, "DINOv2 ViT-S/14, CLS token"),
    HFModelCard("dinov2-base", "facebook/dinov2-base", 768, "dinov2", DINOV2_PREPROCESS, "DINOv2 ViT-B/14, CLS token"),
    HFModelCard("dinov2-large", "facebook/dinov2-large", 1024, "dinov2", DINOV2_PREPROCESS, "DINOv2 ViT-L/14, CLS token"),
    HFModelCard("dinov2-giant", "facebook/dinov2-giant", 1536, "dinov2", DINOV2_PREPROCESS, "DINOv2 ViT-g/14, CLS token"),
    HFModelCard("dinov2-small-reg", "facebook/dinov2-with-registers-small", 384, "dinov2", DINOV2_PREPROCESS,
                "DINOv2 ViT-S/14 with registers, CLS token"),
    HFModelCard("dinov2-base-reg", "facebook/dinov2-with-registers-base", 768, "dinov2", DINOV2_PREPROCESS,
                "DINOv2 ViT-B/14 with registers, CLS token"),
    HFModelCard("dinov2-large-reg", "facebook/dinov2-with-registers-large", 1024, "dinov2", DINOV2_PREPROCESS,
                "DINOv2 ViT-L/14 with registers, CLS token"),
    HFModelCard("dinov2-giant-reg", "facebook/dinov2-with-registers-giant", 1536, "dinov2", DINOV2_PREPROCESS,
                "DINOv2 ViT-g/14 with registers, CLS token"),
    HFModelCard("clip-vit-b16", "openai/clip-vit-base-patch16", 512, "clip", CLIP_PREPROCESS,
                "OpenAI CLIP ViT-B/16, projected image embedding"),
    HFModelCard("clip-vit-l14", "openai/clip-vit-large-patch14", 768, "clip", CLIP_PREPROCESS,
                "OpenAI CLIP ViT-L/14, projected image embedding"),
    HFModelCard("siglip-base", "google/siglip-base-patch16-224", 768, "siglip", SIGLIP_PREPROCESS,
                "SigLIP ViT-B/16 224, pooled image embedding"),
]

_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def preprocess_from_hf_config(cfg: dict, *, where: str = "preprocessor_config.json") -> Preprocess:
    """Translate a Hugging Face image-processor config into a `Preprocess`.

    Supports ``size={"shortest_edge": N}`` with an optional centre crop
    (DINOv2, CLIP, ViT-style) and ``size={"height": S, "width": S}`` without
    a crop (SigLIP, squash).

    Raises
    ------
    EncoderError
        For settings `Preprocess` cannot reproduce (non-square output, a
        rescale factor other than 1/255, unknown resample codes).
    """
    size = cfg.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size} if not cfg.get("default_to_square", True) else {"height": size, "width": size}
    crop = cfg.get("crop_size") or {}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    resample = cfg.get("resample", 3)
    if resample not in _RESAMPLE:
        raise EncoderError(f"{where}: resample={resample!r} is not supported (use one of {sorted(_RESAMPLE)})")
    if abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9 or cfg.get("do_rescale", True) is False:
        raise EncoderError(f"{where}: only rescale_factor=1/255 is supported; got {cfg.get('rescale_factor')}")
    if cfg.get("do_normalize", True):
        mean = tuple(float(x) for x in cfg.get("image_mean", IMAGENET_MEAN))
        std = tuple(float(x) for x in cfg.get("image_std", IMAGENET_STD))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    common = dict(interpolation=_RESAMPLE[resample], mean=mean, std=std)
    if "shortest_edge" in size:
        short = int(size["shortest_edge"])
        if cfg.get("do_center_crop", True) and crop:
            if crop["height"] != crop["width"]:
                raise EncoderError(f"{where}: only square crops are supported; got crop_size={crop}")
            return Preprocess(input_size=int(crop["height"]), crop_pct=int(crop["height"]) / short, **common)
        return Preprocess(input_size=short, crop_pct=1.0, **common)
    if "height" in size and "width" in size:
        if size["height"] != size["width"]:
            raise EncoderError(f"{where}: only square outputs are supported; got size={size}")
        if cfg.get("do_center_crop", False) and crop and crop != size:
            raise EncoderError(f"{where}: a crop after a fixed-size resize is not supported; got size={size}, crop_size={crop}")
        return Preprocess(input_size=int(size["height"]), crop_pct=1.0, resize_mode="squash", **common)
    raise EncoderError(f"{where}: unsupported size setting {size!r} (expected shortest_edge or height/width)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{path}: cannot read ({exc})") from exc


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report (it lists the text tower we drop on purpose) and its bars."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_torch_module(folder: Path, family: Optional[str] = None):
    """The feature extractor for a Hugging Face model folder: (B,3,S,S) float32 -> (B, dim).

    ``family`` (``"dinov2"``, ``"clip"``, ``"siglip"``) is checked against the
    folder's ``config.json``; None accepts any vision model (the CLS/pooled output).
    """
    import torch

    try:
        import transformers
    except ImportError as exc:
        raise EncoderError("Hugging Face encoders need transformers: `pip install 'visual-memory[hf]'`") from exc
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type", "")
    found = _FAMILIES.get(model_type, (None, None))[0]
    if family is not None and found != family:
        raise EncoderError(f"{folder}: config.json has model_type={model_type!r}, not a {family} model")
    kwargs = {}
    if found == "clip":
        cls, output = transformers.CLIPVisionModelWithProjection, "image_embeds"
        if model_type == "clip":
            # A full CLIP checkpoint keeps projection_dim at the top level; the
            # vision sub-config alone would default it to 512.
            vision = transformers.CLIPVisionConfig(**config.get("vision_config", {}))
            vision.projection_dim = int(config.get("projection_dim", vision.projection_dim))
            kwargs["config"] = vision
    elif found == "siglip":
        cls, output = transformers.SiglipVisionModel, "pooler_output"
    else:  # DINOv2 (pooler_output = CLS after the final layer norm) and any other vision backbone
        cls, output = transformers.AutoModel, "pooler_output"
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True,
                                              output_loading_info=True, **kwargs)
    except Exception as exc:
        raise EncoderError(f"{folder}: transformers cannot load this model ({type(exc).__name__}: {exc})") from exc
    # Unexpected keys are expected (a CLIP/SigLIP text tower); a missing or
    # resized vision weight would silently leave random numbers in the encoder.
    bad = list(info.get("missing_keys", [])) + [str(m) for m in info.get("mismatched_keys", [])]
    if bad:
        raise EncoderError(f"{folder}: the checkpoint does not fill the {cls.__name__} (missing or mismatched: "
                           f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})")

    class Features(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixels):
            out = self.model(pixel_values=pixels)
            feats = getattr(out, output, None)
            if feats is None:  # a backbone without a pooler: its first (CLS) token
                feats = out.last_hidden_state[:, 0]
            return feats

    return Features(model).eval()


class HFEncoder(Encoder):
    """An image encoder from a Hugging Face model folder or repository.

    Parameters
    ----------
    name : str
        The encoder's name in the spec (``"dinov2-small"``, ``"hf:owner/repo"``).
    repo : str
        The repository the weights belong to (for error messages and downloads).
    weights : str or PathLike, optional
        A local model folder, or another repository id; default: find ``repo``
        locally (``$VISMEM_WEIGHTS_DIR``, hub cache) or download it unless offline.
    family : str, optional
        Expected model family; checked against the folder's config.
    preprocess : Preprocess, optional
        Overrides the preprocessing (default: the named encoder's, else the
        folder's ``preprocessor_config.json``).
    backend : {"auto", "torch", "onnx"}, default "auto"
        ``"auto"``: ``$VISMEM_HF_BACKEND`` if set, else ONNX Runtime on CPU
        (dinov2-small measured 1.3-2.3x faster than eager PyTorch on 2 loaded cores,
        benchmarks/results/embed_dinov2.json; exported once to the cache
        folder on first use) except for models whose weights exceed 2 GB
        (ONNX's protobuf limit: dinov2-giant), and torch on a GPU.
    device : str, default "auto"
        torch device: cuda, then Apple mps, then cpu.
    batch_size : int, default 32
    """

    def __init__(
        self,
        name: str,
        repo: str,
        *,
        weights=None,
        family: Optional[str] = None,
        preprocess: Optional[Preprocess] = None,
        dim: Optional[int] = None,
        backend: str = "auto",
        device: str = "auto",
        batch_size: int = 32,
    ) -> None:
        folder = resolve_hf_folder(name, repo, weights)
        pre = preprocess
        proc_cfg = folder / "preprocessor_config.json"
        if pre is None:
            if proc_cfg.is_file():
                pre = preprocess_from_hf_config(_read_json(proc_cfg), where=str(proc_cfg))
            else:
                model_type = _read_json(folder / "config.json").get("model_type", "")
                if model_type not in _FAMILIES:
                    raise EncoderError(f"{folder}: no preprocessor_config.json and model_type {model_type!r} has no "
                                       "default preprocessing; pass preprocess=Preprocess(...)")
                pre = _FAMILIES[model_type][1]
        self.folder = folder
        self.batch_size = batch_size
        weights_id = weights_identity(hf_weight_files(folder))
        module = build_torch_module(folder, family)
        auto = backend == "auto"
        if auto:
            backend = os.environ.get("VISMEM_HF_BACKEND") or _auto_backend(module, device)
        if backend not in ("torch", "onnx"):
            raise EncoderError(f"backend must be 'auto', 'onnx' or 'torch'; got {backend!r}")
        if dim is None:
            with __import__("torch").inference_mode():
                dim = int(module(__import__("torch").zeros(1, 3, pre.input_size, pre.input_size)).shape[1])
        self.spec = EncoderSpec(name=name, dim=int(dim), preprocess=pre, weights=weights_id, source=f"hf:{repo}",
                                extra={"folder": str(folder)})
        self._forward = None
        if backend == "onnx":
            path = cache_dir() / "onnx" / f"{name.replace('/', '_').replace(':', '_')}-{weights_id[7:]}.onnx"
            try:
                self._forward = OnnxForward.from_torch(lambda: module, path, input_size=pre.input_size)
            except EncoderError as exc:
                if not auto:
                    raise
                # e.g. DINOv2-with-registers resamples its position embeddings with
                # antialiased bicubic, which the ONNX exporter cannot express.
                log.warning("%s: ONNX export failed, running on torch (%s)", name, str(exc)[:200])
                backend = "torch"
        if self._forward is None:
            self._forward = TorchForward(module, device=device, channels_last=False)
        self.backend = backend

    def forward(self, batch: np.ndarray) -> np.ndarray:
        out = self._forward(batch)
        if out.shape[1] != self.spec.dim:
            raise EncoderError(f"{self.folder}: model gives {out.shape[1]}-d features; encoder {self.name!r} expects {self.spec.dim}")
        return out

    @property
    def torch_module(self):
        """The underlying torch module (for `vismem export-onnx`), or None on the ONNX backend."""
        return getattr(self._forward, "module", None)


def _auto_backend(module, device: str) -> str:
    from .runtime import resolve_device

    if resolve_device(device) != "cpu" or default_backend() != "onnx":
        return "torch"
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    return "onnx" if size < 2_000_000_000 else "torch"


def _register(card: HFModelCard) -> None:
    @register_encoder(
        card.name,
        dim=card.dim,
        input_size=card.preprocess.input_size,
        source=f"hf:{card.repo}",
        description=card.description,
        available=lambda: local_hf_folder(card.repo) is not None,
    )
    def _make(*, weights=None, **kwargs) -> HFEncoder:
        # The paper's preprocessing, whatever the folder's processor config says;
        # the dimension is read off the model (card.dim is what the hub's has).
        pre = kwargs.pop("preprocess", None) or card.preprocess
        return HFEncoder(card.name, card.repo, weights=weights, family=card.family, preprocess=pre, **kwargs)


for _card in CARDS:
    _register(_card)


@register_scheme("hf")
def _make_hf(target: str, *, weights=None, **kwargs) -> HFEncoder:
    """``hf:<repo-or-dir>``: any Hugging Face vision model; preprocessing from its processor config."""
    if not target:
        raise EncoderError("hf: needs a repository id or a folder, e.g. hf:facebook/dinov2-small or hf:/path/to/model")
    path = Path(target).expanduser()
    if path.is_dir():
        path = path.resolve()
        return HFEncoder(f"hf:{path}", path.name, weights=path, **kwargs)
    return HFEncoder(f"hf:{target}", target, weights=weights, **kwargs)
