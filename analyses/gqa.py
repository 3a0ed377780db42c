"""Study B's GQA task CSVs as sweep examples, validated row by row with errors that name the row."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .sweep import STUDY_B_TEMPLATE, SweepExample, iter_rows

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


def read_gqa(csv_path: str | Path, image_dir: str | Path) -> pd.DataFrame:
    """Read and validate a task CSV: known columns, the required ones present, and per row an
    existing image and a valid box. Errors name the file, the line and the question id.

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
    paths, boxes = [], []
    for line, row in iter_rows(frame):
        where = f"{csv_path}, line {line} (question_id {row['question_id']})"
        path = _image_path(image_dir, str(row["img_id"]))
        if path is None:
            raise GQAFormatError(
                f"{where}: image {row['img_id']} not found in {image_dir} ({'/'.join(IMAGE_SUFFIXES)})."
            )
        paths.append(path)
        boxes.append(_box(row, where))
    return frame.assign(image_path=paths, box=boxes)


def gqa_examples(
    csv_path: str | Path, image_dir: str | Path, category: str | None = None, template: str = STUDY_B_TEMPLATE
) -> list[SweepExample]:
    """Sweep examples from a task CSV; the category defaults to the file name's last `_` part.

    Example:
        >>> gqa_examples("GQA_task_ChooseAttr.csv", "imgs")[0].id  # 'ChooseAttr-q1' (see `read_gqa`)
    """
    from PIL import Image

    frame = read_gqa(csv_path, image_dir)
    category = category or Path(csv_path).stem.split("_")[-1]
    loader = lambda path: lambda: Image.open(path).convert("RGB")  # noqa: E731
    return [
        SweepExample(
            f"{category}-{row.question_id}",
            category,
            template.format(question=row.question),
            str(row.answer),
            loader(row.image_path),
            [row.box],
        )
        for row in frame.itertuples()
    ]
