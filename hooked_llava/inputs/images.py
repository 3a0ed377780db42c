"""Images on the scale the model's image processor assumes: the one place where pixels are converted.

`prepare` passes every image through `to_byte_range` (16-bit, float and 0-1 images scaled to 0-255;
the HF image processor then makes them RGB, compositing transparency onto white). `open_image` reads
an image file into memory without converting it, so a 16-bit, float or paletted file reaches
`prepare` as it is and is scaled there: the CLI's `--image` and the sweeps' image folders use it,
and a file fed through any path gives the model the same pixels as `prepare(Image.open(file))`.
`to_rgb` gives the picture the model is shown, for figures that draw the original image.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


def open_image(path: str | Path) -> Any:
    """The image in `path` as a PIL image held in memory, its mode and pixels unchanged (the first frame
    of an animation); `prepare` scales it. PIL's errors (OSError, ValueError) pass through.

    Example:
        >>> from PIL import Image
        >>> Image.fromarray(np.full((32, 32), 40000, np.uint16)).save("scan-16bit.png")
        >>> open_image("scan-16bit.png").mode  # 'I;16' (or 'I'): prepare scales it by 1/257
    """
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.copy()  # detached from the file, which closes here; keeps the palette and transparency


def to_byte_range(image: Any, index: int = 0) -> Any:
    """An image on the 0-255 scale the HF image processor assumes (it multiplies by 1/255).

    16-bit images (PIL modes "I;16*", PIL "I" with values above 255, uint16 arrays) are scaled by
    1/257 instead of being clipped to white; float arrays, tensors and PIL "F" images whose values all
    lie in [0, 1] are taken as already rescaled and multiplied by 255, so they are not rescaled twice.
    Float images outside [0, 255] or with NaN/inf (already normalised?) are refused. Paletted images
    ("P", "PA") become RGB as the HF image processor makes them (transparency composited onto white),
    so a processor that does not convert never reads palette indices as pixel values.

    Example:
        >>> from PIL import Image
        >>> to_byte_range(Image.fromarray(np.full((4, 4), 65535, np.uint16))).getpixel((0, 0))
        255
    """
    mode = getattr(image, "mode", None)  # PIL images only (tensors have a `mode` method)
    if not isinstance(mode, str):
        return _array_to_byte_range(image, index)
    if mode in ("P", "PA"):
        return _composite_rgb(image)
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return image
    from PIL import Image

    values = np.asarray(image)
    if mode == "I" and values.max(initial=0) <= 255 and values.min(initial=0) >= 0:
        return image.convert("L")
    if mode != "F" and (values.min(initial=0) < 0 or values.max(initial=0) > 65535):
        raise ValueError(f"image {index} (PIL mode {mode!r}) holds values outside 0-65535; convert it to 8 bits.")
    scaled = _array_to_byte_range(values.astype(np.float64) / (1 if mode == "F" else 257), index)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def _array_to_byte_range(image: Any, index: int) -> Any:
    dtype = getattr(image, "dtype", None)
    if dtype in (np.uint16, torch.uint16):
        return image / 257
    floating = image.is_floating_point() if isinstance(image, Tensor) else np.issubdtype(dtype, np.floating)
    if not floating:
        return image
    lo, hi = float(image.min()), float(image.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 255:
        raise ValueError(
            f"image {index} is a float image with values from {lo} to {hi}; expected raw pixels in [0, 1] or "
            "[0, 255] (no NaN or inf). If it is already normalised, pass it as pixel_values= instead."
        )
    return image * 255 if hi <= 1 else image


def to_rgb(image: Any) -> Any:
    """A PIL image as the RGB picture the model is shown (before resizing): `to_byte_range`, then RGB as
    the HF image processor makes it (transparency composited onto white). For drawing an image beside
    what the model made of it.

    Example:
        >>> from PIL import Image
        >>> to_rgb(Image.fromarray(np.full((4, 4), 65535, np.uint16))).getpixel((0, 0))
        (255, 255, 255)
    """
    image = to_byte_range(image)
    if image.mode == "RGB":
        return image
    return _composite_rgb(image)


def _composite_rgb(image: Any) -> Any:
    """HF's `convert_to_rgb`: RGB, with any transparency composited onto white."""
    from PIL import Image

    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
