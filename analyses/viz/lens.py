"""`patch_lens_explorer`: the logit lens at every image patch, written on the patch.

Study A's "visual embeddings in vocabulary space", across layers: each patch shows the top token
of its residual stream read through the final norm and the unembedding (`analyses.logit_lens`) at
the chosen layer; hovering shows its top 5 with probabilities. Readout `l < n_layers` is
`resid_pre[l]`, readout `n_layers` the final `resid_post`, as in `logit_lens`.

What it weighs: 5 token ids (into a table of the distinct tokens) and 5 probabilities per patch
and readout, as JSON. Shapes model: 9 readouts x 64 patches, about 60 kB with the image.
LLaVA-1.5-7B: 33 readouts x 576 patches x 5, about 1.3 MB. The lens is computed a few layers at a
time so that the `[layer, patch, d_vocab]` logits stay under about 0.5 GB at 7B's 32000-token vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from analyses.lens import logit_lens, top_k_table
from analyses.readout import lens_positions
from analyses.viz.grid import image_grid
from analyses.viz.page import Explorer, image_uri
from hooked_llava import HookedLlava, LlavaInputs

LENS_BYTES = 512 * 2**20  # logits held at once while reading the lens


def lens_table(model: HookedLlava, inputs: LlavaInputs, positions: list[int], layers: Sequence[int], k: int = 5):
    """`top_k_table` of the logit lens of a one-row batch at `positions` (the drawn cells, row-major)."""
    cells = torch.tensor([positions])  # [1, grid * grid]
    per_chunk = max(1, LENS_BYTES // (cells.shape[1] * model.cfg.d_vocab * 4))
    tables = []
    for start in range(0, len(layers), per_chunk):
        chunk = list(layers[start : start + per_chunk])
        lens = logit_lens(model, inputs, positions=cells, layers=chunk)
        tables.append(top_k_table(model, lens, k=k, layers=chunk, positions=cells))
    import pandas as pd

    return pd.concat(tables, ignore_index=True)


@torch.no_grad()
def patch_lens_explorer(
    model: HookedLlava, inputs: LlavaInputs, row: int = 0, layers: Sequence[int] | None = None, k: int = 5
) -> Explorer:
    """For each image patch, the logit lens's top token at the chosen layer, its top `k` on hover.

    Args:
        model: the model.
        inputs: prepared inputs with an image in row `row` (tiled inputs: the base view's patches).
        row: the batch row shown.
        layers: lens readouts in `0..n_layers` (default all `n_layers + 1`).
        k: tokens listed on hover.

    Returns:
        An `Explorer`. Its DOM has `patch-{r}-{c}` cells with `data-top-token` (the top token, as
        `top_k_table` spells it: the tokenizer's own token string) and `data-prob`, and a `layer-select`.

    Example:
        >>> patch_lens_explorer(model, inputs).save("lens.html")
    """
    if not 0 <= row < len(inputs):
        raise IndexError(f"row {row} is out of range for a batch of {len(inputs)}.")
    one = inputs[[row]]
    n = model.cfg.n_layers
    chosen = list(range(n + 1)) if layers is None else [int(x) % (n + 1) for x in layers]
    lens_positions(one, "image")  # a clear error for inputs without an image
    drawn = image_grid(model, one, 0)
    cell_positions = drawn.positions()
    table = lens_table(model, one, cell_positions, chosen, k)
    grid, kept = drawn.grid, len(chosen)
    vocab = sorted(set(table.token))
    index = {t: i for i, t in enumerate(vocab)}
    shape = (kept, grid * grid, k)
    cell_of = {p: i for i, p in enumerate(cell_positions)}
    ids = np.zeros(shape, dtype=np.int64)
    probs = np.zeros(shape)
    for layer_i, layer in enumerate(chosen):
        part = table[table.layer == layer]
        cells = part.position.map(cell_of).to_numpy()
        ids[layer_i, cells, part["rank"].to_numpy() - 1] = part.token.map(index).to_numpy()
        probs[layer_i, cells, part["rank"].to_numpy() - 1] = part.prob.to_numpy()
    payload = {
        "layers": chosen,
        "n_layers": n,
        "grid": grid,
        "image": image_uri(drawn.image),
        "vocab": vocab,
        "ids": ids.tolist(),
        "probs": np.round(probs, 5).tolist(),
    }
    left_out = drawn.note()
    return Explorer("lens", payload, "logit lens at every image patch" + (f" ({left_out})" if left_out else ""))
