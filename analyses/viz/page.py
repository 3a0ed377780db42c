"""The shared machinery of the explorers: the `Explorer` object, payload encoding and the inlined assets.

An explorer is one `<div>` that holds its data as JSON (`<script type="application/json">`), followed
by the package's own CSS and JavaScript (`analyses/viz/assets/`), inlined: a page with explorers
loads nothing from the network. Large numeric arrays travel quantised (8 or 16 bits), deflated and
base64-encoded (`encode_array`); the browser inflates them with its built-in `DecompressionStream`
and only multiplies back by the stored scale. Every value shown was computed in Python.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import os
import zlib
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

_COUNTER = itertools.count()


def asset(name: str) -> str:
    """The text of a packaged asset (`viz.js`, `viz.css`)."""
    return resources.files("analyses.viz").joinpath("assets", name).read_text(encoding="utf-8")


def encode_array(
    values: Any, bits: int = 16, low: float | None = None, high: float | None = None, gamma: float = 1.0
) -> dict[str, Any]:
    """Quantise an array to unsigned `bits`-bit codes over `[low, high]`, deflate them and base64 them.

    Value `i` reads back as `offset + span * (code[i] / levels) ** gamma` (`levels = 2**bits - 1`), in
    the browser and in `decode_array`. `gamma = 1` spaces the levels evenly (rounding error at most
    `span / (2 * levels)`); `gamma = 2` stores the square root, which resolves small values finely
    (attention weights near 1/n) at the price of a coarser step near `high` (error at most
    `span / levels`). NaN is not allowed.

    Args:
        values: any array-like of numbers (a tensor is moved to the CPU).
        bits: 8 or 16.
        low, high: the range to quantise over (default: the array's min and max).
        gamma: 1 (linear) or more (finer near `low`).

    Returns:
        A JSON-ready dict: `b64`, `bits`, `shape`, `offset`, `span`, `levels`, `gamma`, `nbytes`
        (deflated, before base64).

    Example:
        >>> encode_array(torch.tensor([0.0, 0.5, 1.0]), bits=8)["levels"]  # 255
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits!r}.")
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, np.float64)
    array = array.astype(np.float32 if array.dtype == np.float32 else np.float64, copy=False)
    if array.size and not np.isfinite(array).all():
        raise ValueError("encode_array got NaN or infinite values; the explorers show finite numbers only.")
    low = float(array.min()) if low is None and array.size else float(low or 0.0)
    high = float(array.max()) if high is None and array.size else float(high if high is not None else 1.0)
    levels, span = (1 << bits) - 1, max(high - low, 0.0)
    unit = np.clip((array - low) / (span or 1.0), 0.0, 1.0) ** (1.0 / gamma)
    codes = np.rint(unit * levels).astype("<u2" if bits == 16 else "u1")
    packed = zlib.compress(codes.tobytes(), 6)
    return {
        "b64": base64.b64encode(packed).decode("ascii"),
        "bits": bits,
        "shape": list(array.shape),
        "offset": low,
        "span": span,
        "levels": levels,
        "gamma": gamma,
        "nbytes": len(packed),
    }


def decode_array(encoded: dict[str, Any]) -> np.ndarray:
    """The values `encode_array` stored, as the browser reads them back (for tests and users' checks)."""
    raw = zlib.decompress(base64.b64decode(encoded["b64"]))
    codes = np.frombuffer(raw, dtype="<u2" if encoded["bits"] == 16 else "u1").astype(np.float64)
    unit = (codes / encoded["levels"]) ** encoded["gamma"]
    return (encoded["offset"] + encoded["span"] * unit).reshape(encoded["shape"])


def image_uri(image: np.ndarray) -> str:
    """An `[h, w, 3]` float image in [0, 1] as a `data:` URI (PNG)."""
    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _json_for_script(payload: dict[str, Any]) -> str:
    """JSON safe inside a `<script>` element (no `</script>` or `<!--` can close it early)."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class Explorer:
    """A self-contained interactive view: `to_html()`, `save(path)`, and `_repr_html_()` for notebooks.

    Attributes:
        kind: "attention", "lens" or "features" (which view the JavaScript draws).
        payload: the JSON data the view shows.
        title: a heading shown above the view.

    Example:
        >>> view = attention_explorer(model, inputs)
        >>> view.save("attention.html"); len(view.to_html())
    """

    def __init__(self, kind: str, payload: dict[str, Any], title: str = ""):
        self.kind, self.payload, self.title = kind, payload, title

    def fragment(self, assets: bool = True) -> str:
        """The view as an HTML fragment (a `<div>`, its data and, with `assets`, the inlined CSS and JS).

        In a page holding several explorers, the assets are needed once (`page_assets()`).
        """
        uid = f"hlv{os.getpid()}x{next(_COUNTER)}"
        title = f'<div class="hlv-title">{html.escape(self.title)}</div>' if self.title else ""
        body = (
            f'<div class="hlv-root" id="{uid}" data-kind="{self.kind}" data-testid="explorer-{self.kind}">{title}'
            f'<div class="hlv-body">loading…</div></div>'
            f'<script type="application/json" id="{uid}-data">{_json_for_script(self.payload)}</script>'
        )
        return body + (page_assets() if assets else "")

    def to_html(self) -> str:
        """A complete HTML page with this view alone."""
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title or 'hooked-llava explorer')}</title></head>"
            f"<body>{self.fragment()}</body></html>"
        )

    def _repr_html_(self) -> str:
        return self.fragment()

    def save(self, path: str | Path) -> Path:
        """Write `to_html()` to `path` (UTF-8) and return the path."""
        path = Path(path)
        path.write_text(self.to_html(), encoding="utf-8")
        return path

    def nbytes(self) -> int:
        """Size of `to_html()` in bytes: what the view weighs in a page or a notebook."""
        return len(self.to_html().encode("utf-8"))


def page_assets() -> str:
    """The inlined CSS and JavaScript that draw every explorer on a page (safe to include more than once)."""
    return f"<style>{asset('viz.css')}</style><script>{asset('viz.js')}</script>"
