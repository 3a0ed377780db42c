"""Study B's GQA task CSVs as sweep examples, validated row by row with errors that name the row.

A row with a missing image or a bad box raises `GQAFormatError`, or, when a `bad_rows` list is
given, is skipped and listed there (the CLI's `--skip-bad-rows` writes them to errors.csv).
Duplicate question ids are always refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analyses.information_flow.sweep import STUDY_B_TEMPLATE, SweepExample, iter_rows

# The columns of the study's task files (datasets/GQA_val_correct_question_with_*.csv).
GQA_COLUMNS = (
    "question_id", "img_id", "question", "answer", "true option", "false option", "central object name",
    "central object id", "central object attributes", "central object question attribute", "all objects",
    "all objects attributes", "type_detailed", "type_semantic", "type_structural", "operations", "operation_1",
    "operation_2", "captions", "image_w", "image_h", "central object w", "central object h", "central object x",
    "central object y", "full answer",
)  # fmt: skip
REQUIRED = ("question_id", "img_id", "question", "answer", "central object x", "central object y",
            "central object w", "central object h")  # fmt: skip
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class GQAFormatError(ValueError):
    """A GQA task CSV does not follow the study's format; the message names the file, line and row."""


@dataclass(frozen=True)
class ImageFile:
    """A loader for an image file: calling it opens the image as RGB; sweeps key it by `path`'s bytes.

    Example:
        >>> image.save("img.png"); ImageFile(Path("img.png"))().size == image.size
        True
    """

    path: Path

    def __call__(self) -> Any:
        from PIL import Image

        with Image.open(self.path) as image:
            return image.convert("RGB")


def _check_unique(frame: pd.DataFrame, csv_path: Path) -> None:
    lines = frame.groupby(frame["question_id"].astype(str), sort=False).indices
    dup = {qid: [int(i) + 2 for i in rows] for qid, rows in lines.items() if len(rows) > 1}
    if dup:
        where = "; ".join(f"question_id {qid} on lines {rows}" for qid, rows in dup.items())
        raise GQAFormatError(f"{csv_path}: duplicate question ids ({where}); each question must appear once.")


def _image_path(image_dir: Path, img_id: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = image_dir / f"{img_id}{suffix}"
        if path.exists():
            return path
    return None


def _box(row: pd.Series, where: str) -> tuple[float, float, float, float]:
    try:
        x, y, w, h = (float(row[f"central object {k}"]) for k in "xywh")
    except (TypeError, ValueError) as err:
        raise GQAFormatError(f"{where}: the bounding box is not numeric ({err}).") from err
    bad = not all(v == v for v in (x, y, w, h)) or x < 0 or y < 0 or w <= 0 or h <= 0
    limits = [row.get("image_w"), row.get("image_h")]
    if not bad and all(isinstance(v, (int, float)) and v == v for v in limits):
        bad = x + w > float(limits[0]) + 1 or y + h > float(limits[1]) + 1
    if bad:
        raise GQAFormatError(
            f"{where}: bad bounding box x={x}, y={y}, w={w}, h={h}; it must have w, h > 0 and lie inside the "
            "image (image_w × image_h)."
        )
    return (x, y, x + w, y + h)


def _check_row(row: pd.Series, image_dir: Path, where: str) -> tuple[Path, tuple[float, float, float, float]]:
    path = _image_path(image_dir, str(row["img_id"]))
    if path is None:
        raise GQAFormatError(f"{where}: image {row['img_id']} not found in {image_dir} ({'/'.join(IMAGE_SUFFIXES)}).")
    return path, _box(row, where)


def read_gqa(csv_path: str | Path, image_dir: str | Path, bad_rows: list[dict[str, str]] | None = None) -> pd.DataFrame:
    """Read and validate a task CSV: known columns, the required ones present, unique question ids,
    and per row an existing image and a valid box. Errors name the file, the line and the question id.

    Args:
        csv_path: the task CSV.
        image_dir: the folder of its images (`{img_id}.jpg`, `.jpeg` or `.png`).
        bad_rows: None: a bad row raises `GQAFormatError`. A list: bad rows are left out and appended
            to it as {"id": question id, "origin": file and line, "error": the message}.

    Example:
        >>> row = {"question_id": "q1", "img_id": "img0", "question": "Is the circle red or blue?", "answer": "red",
        ...        "central object x": 0, "central object y": 0, "central object w": 8, "central object h": 8}
        >>> Path("imgs").mkdir(exist_ok=True); image.save("imgs/img0.jpg")
        >>> pd.DataFrame([row]).to_csv("GQA_task_ChooseAttr.csv", index=False)
        >>> read_gqa("GQA_task_ChooseAttr.csv", "imgs").box[0]  # (0.0, 0.0, 8.0, 8.0)
    """
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    frame = pd.read_csv(csv_path, dtype={"question_id": str, "img_id": str})
    unknown = [c for c in frame.columns if c not in GQA_COLUMNS]
    if unknown:
        raise GQAFormatError(f"{csv_path}, line 1 (header): unknown column(s) {unknown}; expected the study's columns.")
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise GQAFormatError(f"{csv_path}, line 1 (header): missing required column(s) {missing}.")
    _check_unique(frame, csv_path)
    keep, paths, boxes, origins = [], [], [], []
    for i, (line, row) in enumerate(iter_rows(frame)):
        origin = f"{csv_path}, line {line} (question_id {row['question_id']})"
        try:
            path, box = _check_row(row, image_dir, origin)
        except GQAFormatError as err:
            if bad_rows is None:
                raise
            bad_rows.append({"id": str(row["question_id"]), "origin": origin, "error": str(err)})
            continue
        keep.append(i), paths.append(path), boxes.append(box), origins.append(origin)
    return frame.iloc[keep].assign(image_path=paths, box=boxes, origin=origins)


def gqa_examples(
    csv_path: str | Path,
    image_dir: str | Path,
    category: str | None = None,
    template: str = STUDY_B_TEMPLATE,
    bad_rows: list[dict[str, str]] | None = None,
) -> list[SweepExample]:
    """Sweep examples from a task CSV; the category defaults to the file name's last `_` part.
    Each example's `origin` names the file, line and question id; `bad_rows` is as in `read_gqa`.

    Example:
        >>> gqa_examples("GQA_task_ChooseAttr.csv", "imgs")[0].id  # 'ChooseAttr-q1' (see `read_gqa`)
    """
    frame = read_gqa(csv_path, image_dir, bad_rows)
    category = category or Path(csv_path).stem.split("_")[-1]
    return [
        SweepExample(
            f"{category}-{row.question_id}",
            category,
            template.format(question=row.question),
            str(row.answer),
            ImageFile(row.image_path),
            [row.box],
            row.origin,
        )
        for row in frame.itertuples()
    ]
