"""Turn paths, bytes, PIL images and arrays into validated RGB images.

This room knows nothing about vectors. It answers two questions for every
input: *what are its pixels* (an RGB ``PIL.Image``) and *what are its bytes*
(for the content-hash id), and it names the input in every error.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

# A 32x32 CIFAR image is 1K pixels, a 24 MP photo 24M. Anything past ~90 MP is
# either a decompression bomb or not something a classifier should decode.
MAX_PIXELS = int(os.environ.get("VISMEM_MAX_PIXELS", 89_478_485))
MAX_BYTES = int(os.environ.get("VISMEM_MAX_IMAGE_BYTES", 64 * 1024 * 1024))
# Long side / short side. An encoder scales the *short* side up to its input
# size and keeps the aspect, so a 100000x1 strip (370 bytes as a PNG) becomes a
# 22,400,000x224 intermediate (15 GB). Wide phone panoramas are ~10:1.
MAX_ASPECT_RATIO = float(os.environ.get("VISMEM_MAX_ASPECT_RATIO", 50))


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image plus what identifies it.

    Attributes
    ----------
    image : PIL.Image.Image
        RGB image, EXIF orientation applied.
    sha256 : str
        Hex SHA-256 of the encoded bytes (or of the raw pixel buffer for
        arrays and PIL images), the record id when the caller gives none.
    name : str
        Human-readable origin used in errors and as the default ``source``.
    """

    image: Image.Image
    sha256: str
    name: str


def describe(item: object) -> str:
    """A short name for an input, for error messages."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{len(item)} bytes>"
    if isinstance(item, Image.Image):
        return f"<PIL image {item.mode} {item.size[0]}x{item.size[1]}>"
    if isinstance(item, np.ndarray):
        return f"<array {item.dtype} {tuple(item.shape)}>"
    return f"<{type(item).__name__}>"


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: rescale to the 8-bit range rather than clip.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr8 = ((arr - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except Exception as exc:  # pragma: no cover - exotic modes
        raise ImageError(f"{name}: cannot convert image mode {img.mode!r} to RGB ({exc})") from exc


def check_size(width: int, height: int, name: str) -> None:
    """Refuse dimensions no image this library decodes may have.

    Called on the header's size, before any pixel is decoded.

    Parameters
    ----------
    width, height : int
        Pixels.
    name : str
        What to call the image in the error (a path, ``<123 bytes>``, ...).

    Raises
    ------
    ImageError
        Zero width or height; more than `MAX_PIXELS` pixels
        (``$VISMEM_MAX_PIXELS``); an aspect ratio (long side / short side) above
        `MAX_ASPECT_RATIO` (``$VISMEM_MAX_ASPECT_RATIO``).

    >>> check_size(640, 480, "a.jpg")
    >>> check_size(4000, 1, "strip.png")
    Traceback (most recent call last):
    ...
    visual_memory.errors.ImageError: strip.png: 4000x1 has an aspect ratio of 4000:1, above the limit of 50:1 (VISMEM_MAX_ASPECT_RATIO)
    """
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has zero width or height")
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the {MAX_PIXELS}-pixel limit "
            "(possible decompression bomb; raise VISMEM_MAX_PIXELS if the image is genuine)"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"{name}: {width}x{height} has an aspect ratio of {ratio:g}:1, above the limit of "
            f"{MAX_ASPECT_RATIO:g}:1 (VISMEM_MAX_ASPECT_RATIO)"
        )


def _decode_bytes(data: bytes, name: str) -> Image.Image:
    if len(data) == 0:
        raise ImageError(f"{name}: file is empty (0 bytes), not an image")
    if len(data) > MAX_BYTES:
        raise ImageError(f"{name}: {len(data)} bytes exceeds the {MAX_BYTES}-byte limit (VISMEM_MAX_IMAGE_BYTES)")
    try:
        with warnings.catch_warnings():
            # PIL only *warns* between MAX_PIXELS and 2x; we want a hard stop.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            check_size(*img.size, name)  # from the header: nothing decoded yet
            img.load()  # force a full decode so truncation surfaces here, not later
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: rejected as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a recognised image format (is it really an image?)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from exc
    check_size(*img.size, name)  # EXIF rotation swaps the sides, nothing more
    return img


def load_image(item: ImageLike) -> LoadedImage:
    """Decode and validate one input into an RGB image.

    Parameters
    ----------
    item : str, PathLike, bytes, PIL.Image.Image or numpy.ndarray
        A file path, encoded image bytes, a PIL image (any mode), or a uint8
        array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).

    Returns
    -------
    LoadedImage

    Raises
    ------
    ImageError
        Names the input and what is wrong (empty, truncated, not an image,
        too many pixels, bad array shape).
    TypeError
        For unsupported input types; lists the supported ones.
    """
    name = describe(item)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        data = path.read_bytes()
        img = _decode_bytes(data, name)
        return LoadedImage(_to_rgb(img, name), hashlib.sha256(data).hexdigest(), name)
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        img = _decode_bytes(data, name)
        return LoadedImage(_to_rgb(img, name), hashlib.sha256(data).hexdigest(), name)
    if isinstance(item, Image.Image):
        check_size(*item.size, name)
        rgb = _to_rgb(item, name)
        return LoadedImage(rgb, hashlib.sha256(rgb.tobytes()).hexdigest(), name)
    if isinstance(item, np.ndarray):
        arr = item
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise ImageError(f"{name}: expected an array of shape (H, W), (H, W, 3) or (H, W, 4)")
        check_size(arr.shape[1], arr.shape[0], name)
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1:
                arr = (arr * 255.0 + 0.5).astype(np.uint8)
            else:
                raise ImageError(f"{name}: expected uint8 pixels (or floats in [0, 1]); got {arr.dtype}")
        arr = np.ascontiguousarray(arr)
        rgb = _to_rgb(Image.fromarray(arr), name)
        return LoadedImage(rgb, hashlib.sha256(arr.tobytes()).hexdigest(), name)
    raise TypeError(
        f"unsupported image input {type(item).__name__}; expected a path (str/Path), encoded bytes, "
        "a PIL.Image.Image or a uint8 numpy array"
    )


def sha256_of(item: ImageLike) -> str:
    """The content-hash id an image would get (without decoding files)."""
    if isinstance(item, (str, os.PathLike)):
        return hashlib.sha256(Path(item).read_bytes()).hexdigest()
    if isinstance(item, (bytes, bytearray, memoryview)):
        return hashlib.sha256(bytes(item)).hexdigest()
    return load_image(item).sha256


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def scan_folder(root: Union[str, os.PathLike]) -> tuple[list[Path], list[str]]:
    """List an ImageFolder: one sub-folder per class, images inside.

    Returns
    -------
    paths : list of Path, sorted by (class, file name)
    labels : list of str, the sub-folder name of each path

    Raises
    ------
    ImageError
        If ``root`` is not a directory or holds no class sub-folders with images.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImageError(f"{root}: not a directory")
    paths: list[Path] = []
    labels: list[str] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and is_image_file(f):
                paths.append(f)
                labels.append(class_dir.name)
    if not paths:
        raise ImageError(f"{root}: no images found in class sub-folders (expected ROOT/<label>/<image>)")
    return paths, labels


def list_images(root: Union[str, os.PathLike]) -> list[Path]:
    """All image files under a folder (recursively), sorted."""
    root = Path(root)
    return sorted(f for f in root.rglob("*") if f.is_file() and is_image_file(f))


def iter_loaded(items: Sequence[ImageLike], *, workers: int = 2) -> Iterator[LoadedImage]:
    """Decode items in order with a small thread pool (PIL releases the GIL)."""
    if workers <= 1 or len(items) < 8:
        for it in items:
            yield load_image(it)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(load_image, items)


def as_list(images: Union[ImageLike, Iterable[ImageLike]]) -> list[ImageLike]:
    """Accept one image or a sequence of images; always return a list."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        return [images]
    return list(images)
