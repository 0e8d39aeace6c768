"""What schemathesis must know about this API that an OpenAPI schema cannot say: what an image is.

Every ``format: binary`` field of this API is an image. Left alone,
schemathesis would fill them with random bytes, PDFs and ZIP files, which the
server rightly refuses (415), and count each refusal as a rejected valid
request. This strategy makes real, decodable images within the server's limits
(at most 48x48 pixels, so the aspect ratio stays under 50:1), in each format
Pillow writes. Loaded by ``SCHEMATHESIS_HOOKS=schemathesis_hooks`` (tests/ on
``PYTHONPATH``):

    SCHEMATHESIS_HOOKS=schemathesis_hooks PYTHONPATH=tests schemathesis run http://127.0.0.1:8000/openapi.json -H "Authorization: Bearer $TOKEN"
"""

from __future__ import annotations

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

PIL_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")


def encode_image(fmt: str, width: int, height: int, seed: int) -> bytes:
    """Random RGB pixels of this size, encoded in this Pillow format."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


images = st.builds(encode_image, st.sampled_from(PIL_FORMATS), st.integers(1, 48), st.integers(1, 48), st.integers(0, 2**32 - 1))
schemathesis.openapi.format("binary", images)
