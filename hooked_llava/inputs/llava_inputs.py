"""`LlavaInputs`: token ids, pixels and the role of every position.

Positions are data: the inputs object knows which positions are image patches (and where
each one sits in the patch grid), which are the question, which is the last real token,
and which are padding. Analyses ask it; they never hard-code offsets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from hooked_llava.inputs.geometry import Box, image_map, related_mask

if TYPE_CHECKING:
    pass

ROLES = ("image", "question", "last", "text", "template", "pad", "related", "other_image")
# The question is what sits between the image placeholder and the assistant turn, minus
# study B's instruction suffix.
_QUESTION = re.compile(
    r"<image>\s*(?P<q>.*?)\s*(?:Answer the question using a single word or phrase\.)?\s*ASSISTANT:", re.S
)
# Without an image (text QA: "USER: {scene description}\n{question}\nASSISTANT:"), the question is
# the last line of the user's turn.
_TEXT_QUESTION = re.compile(
    r"(?:USER:|\n)[ \t]*(?P<q>[^\n]*?)\s*(?:Answer the question using a single word or phrase\.)?\s*ASSISTANT:"
)


@dataclass
class LlavaInputs:
    """A batch of prompts ready for `HookedLlava`, with per-position roles.

    Attributes:
        input_ids: `[batch, pos]` token ids, image placeholders expanded.
        attention_mask: `[batch, pos]`, 1 for real tokens.
        pixel_values: `[n_images, channels, h, w]` or None.
        image_token_id: the placeholder id.
        tokens_per_image: image tokens each image contributes.
        grid_size: side of the patch grid.
        has_cls: whether each image's first token is CLS (CLIP under the "full" strategy).
        skips_first_patch: whether each image's tokens start at its second patch (a tower without CLS,
            SigLIP, under HF's "default" strategy, which drops the first position all the same).
        squash: whether the image processor resizes to a square without keeping the aspect ratio
            (SigLIP's), instead of a shortest-edge resize and centre crop (CLIP's `crop`).
        question_mask: `[batch, pos]`, the question's own tokens (empty if unknown).
        boxes: per row, bounding boxes `(x0, y0, x1, y1)` in original-image pixels of the
            objects the question is about ("related" patches).
        image_sizes: per image, the original `(height, width)`.
        crop: `(resize_shortest_edge, crop_size)` of the image processor.
        token_tables: per image or video, in order of appearance, each token's kind, tile, cell and box.
        pixel_values_videos: OneVision videos `[n_videos, frames, channels, h, w]`; their positions are
            "image" positions too (the visual role), told apart by `placeholder_mask("video")`.
        batch_num_images: OneVision: how many images each prompt with images holds.
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    pixel_values: Tensor | None = None  # [n_images, channel, h, w]; checked by HookedLlava with a clear message
    image_token_id: int | None = None
    tokens_per_image: int = 0
    grid_size: int = 0
    has_cls: bool = False
    skips_first_patch: bool = False
    squash: bool = False
    question_mask: Bool[Tensor, "batch pos"] | None = None
    boxes: list[list[Box]] | None = None
    image_sizes: list[tuple[int, int]] | None = None
    crop: tuple[int, int] | None = None
    texts: list[str] | None = field(default=None, repr=False)
    token_tables: list[list[tuple]] | None = field(default=None, repr=False)  # NeXT/OneVision, see `image_map`
    pixel_values_videos: Tensor | None = None  # OneVision: [n_videos, frames, channel, h, w]
    video_token_id: int | None = None
    batch_num_images: list[int] | None = None  # OneVision: images per prompt (prompts with images only, as HF)

    # --- shapes and moving -----------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """The shape of `input_ids`, so TransformerLens utilities can size their sweeps."""
        return self.input_ids.shape

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: Any) -> LlavaInputs:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            pixel_values=move(self.pixel_values),
            question_mask=move(self.question_mask),
            pixel_values_videos=move(self.pixel_values_videos),
        )

    def with_pixels(self, pixel_values: Tensor) -> LlavaInputs:
        """The same prompts with other images (e.g. the corrupted scene of a patching pair)."""
        if self.pixel_values is None or pixel_values.shape != self.pixel_values.shape:
            raise ValueError(
                f"replacement pixel_values must have the shape of the current ones, "
                f"{None if self.pixel_values is None else tuple(self.pixel_values.shape)}; "
                f"got {tuple(pixel_values.shape)}."
            )
        return replace(self, pixel_values=pixel_values)

    def __getitem__(self, rows: int | slice | list[int] | Tensor) -> LlavaInputs:
        """Select batch rows with their images: an int, a slice, or a list/tensor of rows in any
        order, repeats allowed (e.g. to run several configurations of one example as a batch)."""
        if isinstance(rows, int):
            rows = [rows]
        picked = list(range(len(self))[rows]) if isinstance(rows, slice) else torch.as_tensor(rows).reshape(-1).tolist()
        if self.video_token_id is not None:  # OneVision: images and videos, several images per prompt
            return self._select_onevision(picked)
        owners = self.image_rows()
        images = [i for r in picked for i, owner in enumerate(owners) if owner == r]
        index = lambda t: None if t is None else t[torch.tensor(picked, dtype=torch.long, device=t.device)]  # noqa: E731
        per_row = lambda xs: None if xs is None else [xs[r] for r in picked]  # noqa: E731
        per_image = lambda xs: None if xs is None else [xs[i] for i in images]  # noqa: E731
        return replace(
            self,
            input_ids=index(self.input_ids),
            attention_mask=index(self.attention_mask),
            # rows without images (the text rows of a mixed batch) keep no empty `[0, c, h, w]` pixel tensor
            pixel_values=None if self.pixel_values is None or not images else self.pixel_values[images],
            question_mask=index(self.question_mask),
            boxes=per_row(self.boxes),
            texts=per_row(self.texts),
            image_sizes=per_image(self.image_sizes),
            token_tables=per_image(self.token_tables),
        )

    def visual_items(self) -> list[tuple[str, int, int]]:
        """Per image or video, in order of appearance (the order of `token_tables`): `(kind, index
        among its kind, batch row)`."""
        mask, item = self.image_mask, self.image_index()
        rows, positions = mask.nonzero(as_tuple=True)
        seen: dict[int, tuple[str, int, int]] = {}
        counts = {"image": 0, "video": 0}
        for r, p, i in zip(rows.tolist(), positions.tolist(), item[mask].tolist(), strict=True):
            if i not in seen:
                kind = "video" if int(self.input_ids[r, p]) == self.video_token_id else "image"
                seen[i] = (kind, counts[kind], r)
                counts[kind] += 1
        return [seen[i] for i in sorted(seen)]

    def _select_onevision(self, picked: list[int]) -> LlavaInputs:
        """`__getitem__` for OneVision inputs: each row keeps its images, videos and images-per-prompt count."""
        items = self.visual_items()
        chosen = [(n, it) for r in picked for n, it in enumerate(items) if it[2] == r]
        images = [it[1] for _, it in chosen if it[0] == "image"]
        videos = [it[1] for _, it in chosen if it[0] == "video"]
        counts = [sum(1 for it in items if it[0] == "image" and it[2] == r) for r in picked]
        index = lambda t: None if t is None else t[torch.tensor(picked, dtype=torch.long, device=t.device)]  # noqa: E731
        per_row = lambda xs: None if xs is None else [xs[r] for r in picked]  # noqa: E731
        take = lambda t, ids: None if t is None or not ids else t[ids]  # noqa: E731
        return replace(
            self,
            input_ids=index(self.input_ids),
            attention_mask=index(self.attention_mask),
            pixel_values=take(self.pixel_values, images),
            pixel_values_videos=take(self.pixel_values_videos, videos),
            question_mask=index(self.question_mask),
            boxes=per_row(self.boxes),
            texts=per_row(self.texts),
            image_sizes=[self.image_sizes[i] for i in images] if self.image_sizes and images else None,
            token_tables=[self.token_tables[n] for n, _ in chosen] if self.token_tables else None,
            batch_num_images=[n for n in counts if n] if self.batch_num_images is not None and images else None,
        )

    # --- roles ---------------------------------------------------------------------------
    @property
    def image_mask(self) -> Bool[Tensor, "batch pos"]:
        """Every visual position: image placeholders, and OneVision's video placeholders."""
        mask = self.placeholder_mask("image")
        return mask | self.placeholder_mask("video") if self.video_token_id is not None else mask

    def placeholder_mask(self, kind: str = "image") -> Bool[Tensor, "batch pos"]:
        """Real positions holding the `kind` ("image" or "video") placeholder."""
        token_id = {"image": self.image_token_id, "video": self.video_token_id}[kind]
        if token_id is None:
            return torch.zeros_like(self.input_ids, dtype=torch.bool)
        return (self.input_ids == token_id) & self.attention_mask.bool()

    @property
    def last(self) -> Int[Tensor, " batch"]:
        """Index of the last real token of each row (works for left and right padding)."""
        pos = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (self.attention_mask.bool() * pos).amax(dim=1)

    def position_ids(self) -> Int[Tensor, "batch pos"]:
        """Rotary positions counting real tokens only, so padding never shifts a prompt."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def image_index(self) -> Int[Tensor, "batch pos"]:
        """For every image position, which image (row of `pixel_values`) it comes from; -1 elsewhere."""
        mask = self.image_mask
        order = mask.flatten().long().cumsum(0).view_as(mask) - 1
        if self.token_tables is not None:  # LLaVA-NeXT: images have different token counts
            ends = torch.tensor([len(t) for t in self.token_tables], device=mask.device).cumsum(0)
            return torch.where(mask, torch.bucketize(order, ends, right=True), -1)
        per = max(self.tokens_per_image, 1)
        return torch.where(mask, order // per, -1)

    def image_rows(self) -> list[int]:
        """The batch row each image belongs to."""
        idx, mask = self.image_index(), self.image_mask
        n = 0 if self.pixel_values is None else self.pixel_values.shape[0]
        rows = mask.nonzero()[:, 0]
        flat = idx[mask]
        return [int(rows[flat == i][0]) for i in range(n)] if len(flat) else [0] * n

    def patch_rc(self) -> Int[Tensor, "batch pos 2"]:
        """(row, column) in the patch grid of every image position; -1 elsewhere and for CLS."""
        mask = self.image_mask
        if self.token_tables is not None:  # LLaVA-NeXT: base or high-res grid; -1 for newlines
            cells = [(t[2], t[3]) if t[0] != "newline" else (-1, -1) for table in self.token_tables for t in table]
            rc = torch.full((*mask.shape, 2), -1, dtype=torch.long, device=mask.device)
            rc[mask] = torch.tensor(cells, dtype=torch.long, device=mask.device)
            return rc
        order = mask.flatten().long().cumsum(0).view_as(mask) - 1
        j = order % max(self.tokens_per_image, 1) - int(self.has_cls) + int(self.skips_first_patch)
        rc = torch.stack([j // max(self.grid_size, 1), j % max(self.grid_size, 1)], dim=-1)
        return torch.where((mask & (j >= 0))[..., None], rc, -1)

    def mask(self, role: str) -> Bool[Tensor, "batch pos"]:
        """Boolean `[batch, pos]` mask of a role (see `ROLES`)."""
        real = self.attention_mask.bool()
        if role == "image":
            return self.image_mask
        if role == "pad":
            return ~real
        if role == "last":
            m = torch.zeros_like(real)
            m[torch.arange(len(self)), self.last] = True
            return m
        if role == "text":
            return real & ~self.image_mask
        if role == "question":
            return torch.zeros_like(real) if self.question_mask is None else self.question_mask & real
        if role == "template":
            return real & ~self.image_mask & ~self.mask("question")
        if role in ("related", "other_image"):
            related = related_mask(self)
            return related if role == "related" else self.image_mask & ~related
        raise KeyError(f"unknown role {role!r}; use one of {ROLES} or an explicit list of positions.")

    def image_map(self) -> Any:
        """A DataFrame with one row per image token: where it sits in the sequence, which image,
        tile and grid cell it comes from, and the pixel box it covers (see `geometry.image_map`)."""
        return image_map(self)

    def positions(self, role: str | list[int] | Tensor) -> list[Int[Tensor, " n"]]:
        """Per row, the positions of a role name or an explicit list of positions."""
        if isinstance(role, str):
            return [row.nonzero()[:, 0] for row in self.mask(role)]
        explicit = torch.as_tensor(role, dtype=torch.long, device=self.input_ids.device)
        return [explicit] * len(self)

    def as_mask(self, role: str | list[int] | Tensor) -> Bool[Tensor, "batch pos"]:
        """A role name, explicit positions, or a mask, as a boolean `[batch, pos]` mask."""
        if isinstance(role, str):
            return self.mask(role)
        role_t = torch.as_tensor(role, device=self.input_ids.device)
        if role_t.dtype == torch.bool:
            return role_t.expand_as(self.input_ids)
        m = torch.zeros_like(self.input_ids, dtype=torch.bool)
        if role_t.ndim == 2:  # per-row positions `[batch, n]`: each row its own
            return m.scatter(1, role_t.long(), True)
        m[:, role_t.long()] = True
        return m


def question_spans(prompts: list[str]) -> list[tuple[int, int] | None]:
    """Character span of the question in LLaVA-style prompts, or None when not found."""
    spans = []
    for prompt in prompts:
        m = (_QUESTION if "<image>" in prompt else _TEXT_QUESTION).search(prompt)
        spans.append(m.span("q") if m and m.group("q") else None)
    return spans
