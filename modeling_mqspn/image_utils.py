"""Reading images: the one loader every image path of the package goes through (docs/DESIGN.md §1, §6).

The region proposers (``proposers_mqspn``), ``MQSPNProcessor`` (crops) and the region feature cache
(``feature_cache``) all read pixels with ``load_rgb_image``, and the dataset readers (``data_mqspn``)
read an image's size with ``upright_image_size``, so that boxes found by one part fit the pixels
another part crops:

* the EXIF orientation is applied (a phone photo stored sideways is read upright), and sizes are
  those of the upright image;
* every mode becomes 8-bit RGB: grayscale, palette, CMYK and RGBA (alpha dropped) by PIL's
  ``convert("RGB")``; 16-bit and 32-bit integer grayscale (``I;16*``, ``I``) is scaled from
  0..65535 to 0..255 (PIL's own conversion clips it, turning most 16-bit photos white);
* an ``http(s)`` URL is fetched with the standard library (``fetch_url``: a timeout of
  ``URL_TIMEOUT`` seconds and a cap of ``URL_MAX_BYTES``); an unreachable, failing, slow or too large
  URL raises ``ValueError`` naming it, so in a batch only its own item fails;
* a file that is missing, empty, truncated, not an image, or larger than PIL's decompression-bomb
  limit (``PIL.Image.MAX_IMAGE_PIXELS`` pixels, twice that for an outright refusal) raises
  ``ValueError`` naming the file, never a PIL-specific exception.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import socket
import urllib.error
import urllib.request
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


# EXIF orientations 5..8 turn the image by 90 degrees: width and height swap.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
__all__ = [
    "URL_MAX_BYTES",
    "URL_TIMEOUT",
    "fetch_url",
    "load_rgb_image",
    "to_rgb",
    "upright_image_size",
]

# Image URLs: seconds per network operation, and the largest download (a photo is a few MB).
URL_TIMEOUT = 20.0
URL_MAX_BYTES = 32 * 1024 * 1024


def _shown(source: str) -> str:
    return source if len(source) < 200 else source[:60] + "..."


def _open(source) -> Tuple[Image.Image, str]:
    """Open (lazily) a path, ``http(s)`` URL or base64 string; returns the image and how to name it."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if os.path.isfile(source):
        return Image.open(source), f"image file {_shown(source)!r}"
    if source.startswith(("http://", "https://")):
        return Image.open(io.BytesIO(fetch_url(source))), f"image URL {_shown(source)!r}"
    encoded = "".join((source.split(",", 1)[1] if source.startswith("data:image/") else source).split())
    try:
        data = base64.b64decode(encoded, validate=True) if encoded else b""
    except (binascii.Error, ValueError):
        data = b""
    if not data:
        raise ValueError(f"image {_shown(source)!r} is neither an existing file, an http(s) URL nor a base64-encoded image")
    return Image.open(io.BytesIO(data)), "base64 image"


def fetch_url(url: str, timeout: Optional[float] = None, max_bytes: Optional[int] = None) -> bytes:
    """The bytes at an ``http(s)`` URL, read with the standard library (``urllib``: nothing to install),
    at most ``max_bytes`` (default ``URL_MAX_BYTES``) within ``timeout`` seconds per network operation
    (default ``URL_TIMEOUT``).

    Raises:
        ValueError: the URL is unreachable, answers an HTTP error, times out or is larger than the cap
            (the message names the URL and the reason).
    """
    timeout = URL_TIMEOUT if timeout is None else timeout
    max_bytes = URL_MAX_BYTES if max_bytes is None else max_bytes
    name = f"image URL {_shown(url)!r}"
    request = urllib.request.Request(url, headers={"User-Agent": "mqspn-image-loader"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ValueError(f"{name} is {int(declared)} bytes, more than the cap of {max_bytes} bytes")
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as error:
        raise ValueError(f"{name} answered HTTP {error.code} ({error.reason})") from None
    except urllib.error.URLError as error:
        raise ValueError(f"{name} is unreachable: {error.reason}") from None
    except (socket.timeout, TimeoutError):
        raise ValueError(f"{name} did not answer within {timeout} s") from None
    except (OSError, http.client.HTTPException) as error:
        raise ValueError(f"{name} could not be read: {error}") from None
    if len(data) > max_bytes:
        raise ValueError(f"{name} is more than the cap of {max_bytes} bytes")
    return data


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode; 16/32-bit integer grayscale is scaled, not clipped, to 0..255."""
    if image.mode in _WIDE_GRAY_MODES:
        gray = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb_image(image) -> Image.Image:
    """An upright 8-bit RGB PIL image from a path, ``http(s)`` URL, base64 string, PIL image or HWC
    uint8 numpy array (module docstring).

    Raises:
        ValueError: the image cannot be read (the message names the source and the reason).
        TypeError: ``image`` is of another type.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"numpy images must be uint8 arrays of shape (H, W) or (H, W, C), got {image.dtype} {image.shape}")
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(
            f"an image must be a path, URL, base64 string, PIL image or uint8 numpy array, got {type(image).__name__}"
        )
    source = os.fspath(image)
    name = f"{'image file' if os.path.isfile(source) else 'image'} {_shown(source)!r}"
    try:
        opened, name = _open(image)
        with opened:
            opened.load()
            return to_rgb(ImageOps.exif_transpose(opened))
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"{name} is refused as a possible decompression bomb ({error}); raise PIL.Image.MAX_IMAGE_PIXELS "
            "if you trust the file"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # SyntaxError: some PIL decoders
        raise ValueError(f"{name} cannot be read: {error}") from None


def upright_image_size(path) -> Tuple[int, int]:
    """``(width, height)`` of an image file as ``load_rgb_image`` reads it (EXIF orientation applied),
    from the file's header only.

    Raises:
        ValueError: the file is missing, not an image, or past PIL's decompression-bomb limit.
    """
    name = f"image file {_shown(os.fspath(path))!r}"
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            orientation = opened.getexif().get(_EXIF_ORIENTATION_TAG)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{name} is refused as a possible decompression bomb ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{name} cannot be read: {error}") from None
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)
