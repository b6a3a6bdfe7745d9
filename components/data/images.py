"""Strict image and mask decoding with Pillow: every file is fully decoded, any mode becomes 8-bit."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from components.data.oneclass import array_item, split_item_path
from components.data.samples import DataError

_DIRECT = {"L", "RGB"}
_VIA_L = {"1", "LA", "La"}


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    if "truncated" in text.lower():
        return "truncated image"
    return f"corrupt image ({type(error).__name__}: {text})"


def _max_value(image: Image.Image) -> int:
    """Full-scale value of an integer image: 65535 for 16-bit, TIFF BitsPerSample where given for 'I'."""
    if image.mode.startswith("I;16"):
        return 65535
    bits = getattr(image, "tag_v2", {}).get(258, (16,))
    bits = bits[0] if isinstance(bits, tuple) else bits
    return min(2 ** int(bits) - 1, 2**31 - 1)


def to_8bit(image: Image.Image, path: str = "<image>") -> Image.Image:
    """Convert any Pillow mode to 8-bit 'L' (single channel) or 'RGB'; alpha is dropped.

    16/32-bit integer images are scaled by their bit depth (65535 -> 255), not min-max normalised;
    float images ('F') are taken as 0-255 intensities and clipped, as Pillow does.
    """
    mode = image.mode
    if mode in _DIRECT:
        return image
    if mode in _VIA_L:
        return image.convert("L")
    if mode in ("P", "PA"):
        return image.convert("RGBA").convert("RGB")
    if mode.startswith("I"):
        array = np.asarray(image).astype(np.float64)
        array = np.clip(np.rint(array * (255.0 / _max_value(image))), 0, 255)
        return Image.fromarray(array.astype(np.uint8))
    if mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8))
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: unsupported image mode {mode}") from e


def decode_sized(
    path: str, data: bytes | None = None, draft: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Fully decode ``path`` (or its already-read bytes ``data``) to 8-bit 'L' or 'RGB' plus its stored size.

    ``draft`` lets JPEG decode at a reduced scale that stays at least that size (faster, and no worse
    after a later downscale); the returned size is then still the file's full (W, H).
    Array-backed ``"<file>#<index>"`` paths come from the per-process cached array.
    """
    if split_item_path(path) is not None:
        image = Image.fromarray(array_item(path))
        return image, image.size
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, whatever others set
    try:
        if (os.path.getsize(path) if data is None else len(data)) == 0:
            raise DataError(f"{path}: zero-byte file")
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            size = image.size
            if draft is not None and image.format == "JPEG":
                image.draft(image.mode, draft)
            image.load()
            return to_8bit(image, path), size
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except UnidentifiedImageError as e:
        raise DataError(f"{path}: not an image (cannot identify image file)") from e
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: {_reason(e)}") from e


def decode(path: str, data: bytes | None = None) -> Image.Image:
    """Fully decoded 8-bit 'L' or 'RGB' image (see :func:`decode_sized`)."""
    return decode_sized(path, data)[0]


def load_image(path: str) -> Image.Image:
    """Fully decoded and verified image as 8-bit 3-channel RGB."""
    image = decode(path)
    return image if image.mode == "RGB" else image.convert("RGB")


def mask_image(path: str, size: tuple[int, int], data: bytes | None = None) -> Image.Image:
    """Decoded mask as an 'L' image; DataError naming the mask if its size is not ``size`` (W, H)."""
    mask = decode(path, data)
    if mask.size != tuple(size):
        w, h = mask.size
        raise DataError(f"{path}: mask size {w}x{h} differs from its image's {size[0]}x{size[1]}")
    return mask if mask.mode == "L" else mask.convert("L")


def load_mask(path: str, size: tuple[int, int]) -> np.ndarray:
    """Mask as bool (H, W), true where the pixel is non-zero; ``size`` is the image's (W, H)."""
    return np.asarray(mask_image(path, size)) > 0
