"""The encoder contract: preprocessing config + batched, normalised embedding.

An encoder turns RGB images into L2-normalised float32 vectors. Its
preprocessing travels with it in a `Preprocess` config (as timm's
``pretrained_cfg`` does) and is written into every memory's manifest, because
accuracy depends on reproducing it exactly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from ..errors import ImageError
from ..images import ImageLike, LoadedImage, as_list, load_image
from ..progress import progress_bar

log = logging.getLogger(__name__)

_RESIZE_MODES = ("shorter", "squash")
# The largest image `Preprocess.resize_crop` may build before its crop (4096^2
# pixels, 48 MiB as RGB). Any image within `images.MAX_ASPECT_RATIO` stays under it
# for every input size up to ~580; the bound stops the rest before PIL allocates.
MAX_RESIZED_PIXELS = int(os.environ.get("VISMEM_MAX_RESIZED_PIXELS", 4096 * 4096))
_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    """How an encoder wants its pixels (the analogue of timm's ``pretrained_cfg``).

    With ``resize_mode="shorter"`` (default): resize the shorter side to
    ``resize_size = floor(input_size / crop_pct)`` keeping the aspect ratio
    (the longer side is truncated, ``int(resize_size * long / short)``), then
    centre-crop ``input_size`` square. With
    ``resize_mode="squash"``: resize straight to ``input_size`` square,
    ignoring the aspect ratio (SigLIP). Then scale to [0, 1], subtract
    ``mean`` and divide by ``std`` (both in [0, 1] units).

    The size arithmetic (floor, truncation, crop offsets) and the
    resampling (PIL, antialiased, ``reducing_gap=None``) are exactly those of
    the reference pipelines: torchvision's ``Resize``/``CenterCrop`` on PIL
    images (timm, the DINOv2 and CLIP repositories) and Hugging Face's PIL
    image processors; ``tests/test_encoders_hf.py`` checks the pixels.

    ``crop_offset``: how the centre crop's offset is rounded when the margin
    is odd: ``"floor"`` (Hugging Face's processors) or ``"round"``
    (torchvision's ``CenterCrop``, Python's round-half-even; timm).

    ``upscale_small``: an image whose shorter side is below ``input_size`` is
    resized so its shorter side is exactly ``input_size`` before the crop,
    instead of overshooting and cropping away its border (a 32x32 CIFAR image
    keeps all of its pixels).

    >>> Preprocess(input_size=224, crop_pct=0.875).resize_size
    256
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    upscale_small: bool = False
    resize_mode: str = "shorter"
    crop_offset: str = "floor"

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}; got {self.interpolation!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1]; got {self.crop_pct}")
        if self.crop_offset not in ("floor", "round"):
            raise ValueError(f"crop_offset must be 'floor' or 'round'; got {self.crop_offset!r}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {sorted(_RESIZE_MODES)}; got {self.resize_mode!r}")
        if int(self.input_size) < 1:
            raise ValueError(f"input_size must be >= 1; got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got mean={self.mean}, std={self.std}")

    @property
    def resize_size(self) -> int:
        # floor like timm's transforms_factory; the epsilon absorbs float noise
        # in crop_pct = crop / size (224 / (224 / 256) must give 256, not 255).
        return int(math.floor(self.input_size / self.crop_pct + 1e-6))

    def geometry(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """``((resized_w, resized_h), crop_box)`` for an image of this size; crop_box is (left, top, right, bottom).

        >>> Preprocess(input_size=224, crop_pct=0.875).geometry(640, 427)
        ((383, 256), (79, 16, 303, 240))
        """
        s = self.input_size
        if self.resize_mode == "squash":
            return (s, s), (0, 0, s, s)
        target = self.resize_size
        if self.upscale_small and min(width, height) < s:
            target = s
        if width <= height:
            nw, nh = target, int(target * height / width)
        else:
            nw, nh = int(target * width / height), target
        if self.crop_offset == "floor":
            left, top = (nw - s) // 2, (nh - s) // 2
        else:
            left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
        return (nw, nh), (left, top, left + s, top + s)

    def resize_crop(self, img: Image.Image, *, name: str = "image") -> Image.Image:
        """RGB PIL image -> resized and cropped RGB PIL image (input_size square).

        Raises `ImageError` (naming ``name``) when the resized image, before
        the crop, would exceed `MAX_RESIZED_PIXELS` (``$VISMEM_MAX_RESIZED_PIXELS``).
        """
        (nw, nh), box = self.geometry(*img.size)
        if nw * nh > MAX_RESIZED_PIXELS:
            raise ImageError(
                f"{name}: {img.size[0]}x{img.size[1]} would be resized to {nw}x{nh} = {nw * nh} pixels before the "
                f"{self.input_size}x{self.input_size} crop, above the limit of {MAX_RESIZED_PIXELS} (VISMEM_MAX_RESIZED_PIXELS)"
            )
        if (nw, nh) != img.size:
            img = img.resize((nw, nh), _INTERPOLATION[self.interpolation], reducing_gap=None)
        if box != (0, 0, nw, nh):
            # PIL pads with black when the crop leaves the image (resize_size <
            # input_size), as torchvision's CenterCrop does.
            img = img.crop(box)
        return img

    def normalize(self, img: Image.Image, out: Optional[np.ndarray] = None) -> np.ndarray:
        """input_size-square RGB PIL image -> float32 (3, S, S), written into ``out`` if given."""
        s = self.input_size
        if out is None:
            out = np.empty((3, s, s), dtype=np.float32)
        # One strided uint8 -> float32 copy into channel-first layout, then two
        # in-place passes: ~8x faster than (arr - mean) / std on an HWC float
        # array followed by transpose + copy (measured 0.17 vs 1.4 ms at 224).
        np.copyto(out, np.asarray(img).transpose(2, 0, 1), casting="unsafe")
        scale, shift = self._affine
        out *= scale
        out += shift
        return out

    @functools.cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        std = np.asarray(self.std, dtype=np.float64) * 255.0
        scale = (1.0 / std).astype(np.float32)[:, None, None]
        shift = (-np.asarray(self.mean, dtype=np.float64) * 255.0 / std).astype(np.float32)[:, None, None]
        return scale, shift

    def __call__(self, img: Image.Image, out: Optional[np.ndarray] = None, *, name: str = "image") -> np.ndarray:
        """RGB PIL image -> float32 array of shape (3, input_size, input_size)."""
        return self.normalize(self.resize_crop(img, name=name), out)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        # Fields added after the first release are left out at their default,
        # so existing memories and embedding caches keep their fingerprints.
        for key, default in (("resize_mode", "shorter"), ("crop_offset", "floor")):
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


@dataclass(frozen=True)
class EncoderSpec:
    """What identifies an encoder's vector space; stored in the manifest.

    Two memories can share vectors only if their ``fingerprint`` matches: the
    name, dimension, weights identity and preprocessing all agree. The runtime
    backend (torch, onnxruntime) is deliberately excluded: it changes speed,
    not the space (cosine >= 0.999 between backends, tested).
    """

    name: str
    dim: int
    preprocess: Preprocess
    weights: str  # identity of the weights (file hash, repo@revision, ...)
    source: str = ""  # where the weights come from, for humans
    extra: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        payload = json.dumps(
            {"name": self.name, "dim": self.dim, "weights": self.weights, "preprocess": self.preprocess.to_dict()},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "weights": self.weights,
            "source": self.source,
            "preprocess": self.preprocess.to_dict(),
            "fingerprint": self.fingerprint,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderSpec":
        return cls(
            name=d["name"],
            dim=int(d["dim"]),
            preprocess=Preprocess.from_dict(d["preprocess"]),
            weights=d["weights"],
            source=d.get("source", ""),
            extra=d.get("extra", {}),
        )


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class Encoder:
    """Base class. Subclasses set ``spec`` and ``_forward`` (a runtime callable).

    ``forward(batch)`` takes float32 (B, 3, S, S) preprocessed pixels and
    returns (B, dim) raw features; `embed` does decoding, preprocessing,
    batching, prefetching, normalisation and progress around it.
    """

    spec: EncoderSpec
    backend: str = "torch"
    batch_size: int = 64

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """float32 (B, 3, S, S) preprocessed pixels -> float32 (B, dim) raw features.

        Runs ``self._forward``, the runtime (`TorchForward`, `OnnxForward`) a
        subclass sets up; override to add checks around it.
        """
        return self._forward(batch)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    def preprocess(self, img: Image.Image) -> np.ndarray:
        return self.spec.preprocess(img)

    def _load_into(self, item: ImageLike, out: np.ndarray) -> LoadedImage:
        loaded = load_image(item)
        self.spec.preprocess(loaded.image, out, name=loaded.name)
        return loaded

    def iter_batches(
        self,
        images: Sequence[ImageLike],
        *,
        batch_size: Optional[int] = None,
        workers: Optional[int] = None,
        progress: bool | str = False,
    ) -> Iterator[tuple[list[LoadedImage], np.ndarray]]:
        """Yield ``(loaded_images, vectors)`` batch by batch, in input order.

        Decoding and preprocessing of the next batches run in a thread pool
        while the model computes the current one (PIL, numpy and the runtimes
        release the GIL), each worker writing straight into the batch array,
        so the model rarely waits for pixels.

        Parameters
        ----------
        images : sequence of images
        batch_size : int, optional
            Images per forward pass; default ``self.batch_size``.
        workers : int, optional
            Decode/preprocess threads; default ``$VISMEM_DECODE_WORKERS`` or
            the number of CPU cores (more only adds contention with the
            model's own threads).
        progress : bool or str

        Yields
        ------
        loaded : list of LoadedImage
        vectors : numpy.ndarray of shape (len(loaded), dim), float32, L2-normalised
        """
        images = as_list(images)
        bs = int(batch_size or self.batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1; got {bs}")
        if workers is None:
            workers = int(os.environ.get("VISMEM_DECODE_WORKERS", 0)) or os.cpu_count() or 1
        n = len(images)
        s = self.spec.preprocess.input_size
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, progress_bar(
            progress, total=n, unit="img"
        ) as bar:
            pending: deque = deque()
            lookahead = 2  # batches decoded ahead of the model
            starts = iter(range(0, n, bs))

            def submit_next() -> None:
                start = next(starts, None)
                if start is not None:
                    chunk = images[start : start + bs]
                    pixels = np.empty((len(chunk), 3, s, s), dtype=np.float32)
                    pending.append((pixels, [pool.submit(self._load_into, it, pixels[i]) for i, it in enumerate(chunk)]))

            for _ in range(lookahead + 1):
                submit_next()
            while pending:
                pixels, futures = pending.popleft()
                submit_next()
                try:
                    loaded = [f.result() for f in futures]
                except BaseException:
                    for _, batch in pending:
                        for f in batch:
                            f.cancel()
                    raise
                vectors = l2_normalize(self.forward(pixels))
                bar.advance(len(loaded))
                yield loaded, vectors

    def embed(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        batch_size: Optional[int] = None,
        progress: bool | str = False,
    ) -> np.ndarray:
        """Embed images.

        Parameters
        ----------
        images : image or sequence of images
            Paths, bytes, PIL images or uint8 arrays (see `visual_memory.images.load_image`).
        batch_size : int, optional
            Images per forward pass; default ``self.batch_size``.
        progress : bool or str
            Show a progress bar (a string is used as its description).

        Returns
        -------
        numpy.ndarray of shape (n_images, dim), float32, rows L2-normalised.
        """
        items = as_list(images)
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate([v for _, v in self.iter_batches(items, batch_size=batch_size, progress=progress)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.spec.name!r}, dim={self.spec.dim}, backend={self.backend!r})"


ForwardFn = Callable[[np.ndarray], np.ndarray]
