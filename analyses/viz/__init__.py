"""Interactive views for notebooks and the report: self-contained HTML, no CDN, no server, no network.

- `attention_explorer`: click a token, see where it looks in the image (and the text); click a patch,
  see what attends to it; language model or vision tower (`attention.py`).
- `patch_lens_explorer`: the logit lens's top token written on each image patch, per layer (`lens.py`).
- `feature_explorer`: an SAE or transcoder feature over the patches of several scenes (`features.py`).

Each returns an `Explorer` (`page.py`) with `.to_html()`, `.save(path)` and `_repr_html_()`. The
JavaScript and CSS (`assets/`) ship as package data and are inlined into every page; they only
draw values computed here in Python (quantised for size, see each module's docstring for what a
view weighs at LLaVA-1.5-7B scale). Stable `data-testid` attributes (`token-{i}`, `patch-{r}-{c}`,
`layer-select`, `head-select`, ...) let tests and users' scripts drive the views.

May import: the analyses packages below the report (`analyses.lens`, `analyses.patch_maps`,
`analyses.plotting`, `analyses.saes`, `analyses.readout`) and the public packages of `hooked_llava`.
Only `analyses.report` imports it (the `layers` contract in pyproject.toml).
"""

from analyses.viz.attention import attention_explorer, build_attention_view
from analyses.viz.features import feature_explorer
from analyses.viz.lens import patch_lens_explorer
from analyses.viz.page import Explorer, decode_array, page_assets

__all__ = [
    "Explorer",
    "attention_explorer",
    "build_attention_view",
    "decode_array",
    "feature_explorer",
    "page_assets",
    "patch_lens_explorer",
]
