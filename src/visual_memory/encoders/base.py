"""The encoder contract: preprocessing config + batched, normalised embedding.

An encoder turns RGB images into L2-normalised float32 vectors. Its
preprocessing travels with it in a `Preprocess` config (as timm's
``pretrained_cfg`` does) and is written into every memory's manifest, because
accuracy depends on reproducing it exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from ..images import ImageLike, LoadedImage, as_list, load_image
from ..progress import progress_bar

log = logging.getLogger(__name__)

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    """How an encoder wants its pixels.

    Resize the shorter side to ``round(input_size / crop_pct)`` with
    ``interpolation`` (antialiased), centre-crop ``input_size`` square, scale to
    [0, 1], subtract ``mean`` and divide by ``std`` (both in [0, 1] units).

    ``upscale_small``: an image whose shorter side is below ``input_size`` is
    resized so its shorter side is exactly ``input_size`` before the crop,
    instead of overshooting and cropping away its border (a 32x32 CIFAR image
    keeps all of its pixels).
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    upscale_small: bool = False

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}; got {self.interpolation!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1]; got {self.crop_pct}")

    @property
    def resize_size(self) -> int:
        return int(round(self.input_size / self.crop_pct))

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 array of shape (3, input_size, input_size)."""
        w, h = img.size
        target = self.resize_size
        if self.upscale_small and min(w, h) < self.input_size:
            target = self.input_size
        scale = target / min(w, h)
        nw, nh = max(target, round(w * scale)), max(target, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), _INTERPOLATION[self.interpolation], reducing_gap=None)
        s = self.input_size
        left, top = (nw - s) // 2, (nh - s) // 2
        if (left, top, nw, nh) != (0, 0, s, s):
            img = img.crop((left, top, left + s, top + s))
        arr = np.asarray(img, dtype=np.float32)  # (H, W, 3) in 0..255
        mean = np.asarray(self.mean, dtype=np.float32) * 255.0
        inv_std = 1.0 / (np.asarray(self.std, dtype=np.float32) * 255.0)
        return np.ascontiguousarray(((arr - mean) * inv_std).transpose(2, 0, 1))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
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
    """Base class. Subclasses set ``spec`` and implement ``forward``.

    ``forward(batch)`` takes float32 (B, 3, S, S) preprocessed pixels and
    returns (B, dim) raw features; `embed` does decoding, preprocessing,
    batching, prefetching, normalisation and progress around it.
    """

    spec: EncoderSpec
    backend: str = "torch"
    batch_size: int = 64

    def forward(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    def preprocess(self, img: Image.Image) -> np.ndarray:
        return self.spec.preprocess(img)

    def _load_and_preprocess(self, item: ImageLike) -> tuple[LoadedImage, np.ndarray]:
        loaded = load_image(item)
        return loaded, self.preprocess(loaded.image)

    def iter_batches(
        self,
        images: Sequence[ImageLike],
        *,
        batch_size: Optional[int] = None,
        workers: int = 2,
        progress: bool | str = False,
    ) -> Iterator[tuple[list[LoadedImage], np.ndarray]]:
        """Yield ``(loaded_images, vectors)`` batch by batch, in input order.

        Decoding and preprocessing of the next batches run in a thread pool
        while the model computes the current one (PIL and the runtimes release
        the GIL), so the model rarely waits for pixels.

        Returns vectors of shape (len(batch), dim), float32, L2-normalised.
        """
        images = as_list(images)
        bs = int(batch_size or self.batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1; got {bs}")
        n = len(images)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, progress_bar(
            progress, total=n, unit="img"
        ) as bar:
            pending: deque = deque()
            lookahead = 2  # batches decoded ahead of the model
            starts = iter(range(0, n, bs))

            def submit_next() -> None:
                start = next(starts, None)
                if start is not None:
                    pending.append([pool.submit(self._load_and_preprocess, it) for it in images[start : start + bs]])

            for _ in range(lookahead + 1):
                submit_next()
            while pending:
                futures = pending.popleft()
                submit_next()
                try:
                    results = [f.result() for f in futures]
                except BaseException:
                    for batch in pending:
                        for f in batch:
                            f.cancel()
                    raise
                loaded = [r[0] for r in results]
                pixels = np.stack([r[1] for r in results])
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
