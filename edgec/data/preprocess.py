"""Image decoding and the one preprocessing path used by every stage (torch-free).

Golden inputs, calibration batches, distillation data and on-device verification all go
through :class:`Preprocess`, so an artifact is never judged on pixels prepared differently
from the ones it was calibrated on.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """How raw images become model input: the record that travels in every manifest."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    resize: Literal["bicubic", "bilinear", "nearest", "lanczos"] = "bicubic"
    crop: Literal["center", "none"] = "center"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    version: int = field(default=1)

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be [height, width] of positive integers, got {list(self.size)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")
        if self.resize not in _RESAMPLE:
            raise ValueError(f"resize must be one of {sorted(_RESAMPLE)}, got {self.resize!r}")

    def to_json(self) -> dict:
        return {
            "size": list(self.size),
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": self.layout,
        }

    @classmethod
    def from_json(cls, data: dict) -> Preprocess:
        return cls(
            size=tuple(int(v) for v in data["size"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            resize=data.get("resize", "bicubic"),
            crop=data.get("crop", "center"),
            layout=data.get("layout", "NCHW"),
        )

    def with_size(self, size: int | tuple[int, int]) -> Preprocess:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return Preprocess(hw, self.mean, self.std, self.resize, self.crop, self.layout)

    def resize_image(self, img: Image.Image) -> Image.Image:
        """Resize (and centre-crop) to ``size``; the result is RGB uint8."""
        h, w = self.size
        resample = _RESAMPLE[self.resize]
        if self.crop == "none":
            return img.resize((w, h), resample)
        scale = max(h / img.height, w / img.width)
        rw, rh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
        if (rw, rh) != img.size:
            img = img.resize((rw, rh), resample)
        left, top = (rw - w) // 2, (rh - h) // 2
        return img.crop((left, top, left + w, top + h))

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 HWC (or NHWC) -> float32 normalised in ``layout``."""
        x = rgb.astype(np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            x = np.moveaxis(x, -1, -3)
        return np.ascontiguousarray(x, dtype=np.float32)

    def __call__(self, img: Image.Image) -> np.ndarray:
        return self.normalize(np.asarray(self.resize_image(to_rgb(img))))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any valid Pillow image as 8-bit RGB.

    Grayscale, palette, CMYK and YCbCr convert directly; 16- and 32-bit integer and float
    images are rescaled to 8 bits from their own range; alpha is composited over white.
    """
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            if img.mode == "I" and lo >= 0 and hi <= 255:
                lo, hi = 0.0, 255.0
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(np.clip(scaled.round(), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


# Pillow's default limit: an image with more pixels is refused as a likely decompression bomb
# (a small file that expands to gigabytes), before its pixels are decoded.
MAX_PIXELS = 89_478_485


def load_image(path: str | Path | bytes, *, name: str | None = None) -> Image.Image:
    """Decode ``path`` (or the encoded bytes of an image, ``name`` saying where they came from) as RGB;
    :class:`InputError` when it is missing, not an image, or a decompression bomb."""
    where = name or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(path) if isinstance(path, bytes) else Path(path)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise InputError(f"refused image {where}: {img.width}x{img.height} pixels is over the "
                                     f"{MAX_PIXELS:,}-pixel limit (decompression bomb?)",
                                     hint="resize it below the limit, or remove it")
                img.load()
                return to_rgb(img)
    except FileNotFoundError:
        raise InputError(f"image not found: {where}", hint="check the path in your data folder") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"refused image {where}: {exc}", hint="resize it below the limit, or remove it") from None
    except UnidentifiedImageError:
        raise InputError(f"cannot decode image {where}: not an image format Pillow reads",
                         hint="re-export it as PNG or JPEG, or remove it") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise InputError(f"cannot decode image {where}: {exc}", hint="re-export it as PNG or JPEG, or remove it") from None
