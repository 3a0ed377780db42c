"""Study B's GQA task CSVs as sweep examples, validated row by row with errors that name the row.

A bad row (a wrong number of fields, an empty or unsafe question id, an empty question or answer, a
missing image, a bad box) raises `GQAFormatError`, or, when a `bad_rows` list is given, is skipped
and listed there (the CLI's `--skip-bad-rows` writes them to errors.csv); a question word or answer
the tokenizer lacks is found when the row is swept, and handled the same way. A file that cannot be
used at all (unreadable, empty, a bad header, duplicate question ids) raises `GQAFileError`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analyses.information_flow.examples import STUDY_B_TEMPLATE, SweepExample, id_problem
from hooked_llava.inputs.images import open_image

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


class GQAFileError(GQAFormatError):
    """The file as a whole cannot be used (unreadable, empty, bad header, duplicate ids): no row can be skipped."""


@dataclass(frozen=True)
class ImageFile:
    """A loader for an image file: calling it reads the image unconverted (`prepare` scales 16-bit, float
    and paletted images, see `hooked_llava.inputs.images`); sweeps key it by `path`'s bytes.

    Example:
        >>> image.save("img.png"); ImageFile(Path("img.png"))().size == image.size
        True
    """

    path: Path

    def __call__(self) -> Any:
        return open_image(self.path)


def _records(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and every non-blank record with the line it starts on (quoted fields may span lines)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise GQAFileError(f"{csv_path}: cannot read it ({reason}); give a UTF-8 CSV file.") from err
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    records, start = [], 1
    try:
        for record in reader:
            if record:
                records.append((start, record))
            start = reader.line_num + 1
    except csv.Error as err:
        raise GQAFileError(f"{csv_path}, line {reader.line_num}: not valid CSV ({err}).") from err
    if not records:
        raise GQAFileError(f"{csv_path} is empty: expected a header line with the study's columns, then one row "
                           "per question.")  # fmt: skip
    header = [name.strip() for name in records[0][1]]
    if len(records) == 1:
        raise GQAFileError(f"{csv_path} has a header but no rows: there is nothing to sweep.")
    return header, records[1:]


def _check_header(header: list[str], csv_path: Path) -> None:
    unknown = [c for c in header if c not in GQA_COLUMNS]
    if unknown:
        raise GQAFileError(f"{csv_path}, line 1 (header): unknown column(s) {unknown}; expected the study's columns.")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise GQAFileError(f"{csv_path}, line 1 (header): missing required column(s) {missing}.")
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise GQAFileError(f"{csv_path}, line 1 (header): repeated column(s) {repeated}.")


def _check_unique(rows: list[tuple[int, dict[str, str]]], csv_path: Path) -> None:
    lines: dict[str, list[int]] = {}
    for line, row in rows:
        if row["question_id"].strip():
            lines.setdefault(row["question_id"].strip(), []).append(line)
    dup = {qid: where for qid, where in lines.items() if len(where) > 1}
    if dup:
        where = "; ".join(f"question_id {qid} on lines {rows}" for qid, rows in dup.items())
        raise GQAFileError(f"{csv_path}: duplicate question ids ({where}); each question must appear once.")


def _image_path(image_dir: Path, img_id: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = image_dir / f"{img_id}{suffix}"
        if path.exists():
            return path
    return None


def _number(row: dict[str, str], column: str, where: str) -> float:
    try:
        return float(row[column])
    except (TypeError, ValueError) as err:
        raise GQAFormatError(f"{where}: the bounding box is not numeric ({column} = {row[column]!r}).") from err


def _box(row: dict[str, str], where: str) -> tuple[float, float, float, float]:
    x, y, w, h = (_number(row, f"central object {k}", where) for k in "xywh")
    bad = not all(math.isfinite(v) for v in (x, y, w, h)) or x < 0 or y < 0 or w <= 0 or h <= 0
    limits = [row.get("image_w", "").strip(), row.get("image_h", "").strip()]
    if not bad and all(limits):
        width, height = (_number(row, c, where) for c in ("image_w", "image_h"))
        bad = x + w > width + 1 or y + h > height + 1
    if bad:
        raise GQAFormatError(
            f"{where}: bad bounding box x={x}, y={y}, w={w}, h={h}; it must have w, h > 0 and lie inside the "
            "image (image_w × image_h)."
        )
    return (x, y, x + w, y + h)


def _check_row(row: dict[str, str], image_dir: Path, where: str) -> tuple[Path, tuple[float, float, float, float]]:
    """The row's image and box; an empty or unsafe id, an empty question or answer is an error naming the row."""
    qid, img_id = row["question_id"].strip(), row["img_id"].strip()
    problem = id_problem(qid)
    if problem:
        raise GQAFormatError(f"{where}: unusable question_id {qid!r} ({problem}); ids name the result files.")
    for column in ("question", "answer"):
        if not row[column].strip():
            raise GQAFormatError(f"{where}: the {column} is empty.")
    if id_problem(img_id) or ".." in img_id:
        raise GQAFormatError(f"{where}: unusable img_id {img_id!r}: give the image's file name without a folder.")
    path = _image_path(image_dir, img_id)
    if path is None:
        raise GQAFormatError(f"{where}: image {img_id} not found in {image_dir} ({'/'.join(IMAGE_SUFFIXES)}).")
    return path, _box(row, where)


Row = tuple[int, str, "dict[str, str] | GQAFormatError"]  # line, question id, the row by column or its error


def _rows(csv_path: Path) -> list[Row]:
    """The records as rows by column, in file order; one with a wrong number of fields is its error."""
    header, records = _records(csv_path)
    _check_header(header, csv_path)
    rows: list[Row] = []
    at = header.index("question_id")
    for line, record in records:
        qid = record[at].strip() if len(record) > at else ""
        if len(record) == len(header):
            rows.append((line, qid, dict(zip(header, record, strict=True))))
            continue
        origin = f"{csv_path}, line {line} (question_id {qid or '(empty)'})"
        rows.append((line, qid, GQAFormatError(f"{origin}: {len(record)} fields where the header has {len(header)}.")))
    return rows


def read_gqa(csv_path: str | Path, image_dir: str | Path, bad_rows: list[dict[str, str]] | None = None) -> pd.DataFrame:
    """Read and validate a task CSV: a readable, non-empty file, known columns, the required ones present,
    unique question ids, and per row the header's number of fields, a usable question id, a question, an
    answer, an existing image and a valid box. Errors name the file, the line and the question id.

    Args:
        csv_path: the task CSV (UTF-8).
        image_dir: the folder of its images (`{img_id}.jpg`, `.jpeg` or `.png`).
        bad_rows: None: a bad row raises `GQAFormatError`. A list: bad rows are left out and appended
            to it as {"id": question id, "origin": file and line, "error": the message}. A file that
            cannot be used at all raises `GQAFileError` either way.

    Returns:
        The good rows (every column as text, the id and question stripped), with `image_path`, `box`
        and `origin` added.

    Example:
        >>> row = {"question_id": "q1", "img_id": "img0", "question": "Is the circle red or blue?", "answer": "red",
        ...        "central object x": 0, "central object y": 0, "central object w": 8, "central object h": 8}
        >>> Path("imgs").mkdir(exist_ok=True); image.save("imgs/img0.jpg")
        >>> pd.DataFrame([row]).to_csv("GQA_task_ChooseAttr.csv", index=False)
        >>> read_gqa("GQA_task_ChooseAttr.csv", "imgs").box[0]  # (0.0, 0.0, 8.0, 8.0)
    """
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    rows = _rows(csv_path)
    _check_unique([(line, row) for line, _, row in rows if isinstance(row, dict)], csv_path)
    keep = []
    for line, qid, row in rows:
        origin = f"{csv_path}, line {line} (question_id {qid or '(empty)'})"
        try:
            if isinstance(row, GQAFormatError):
                raise row
            path, box = _check_row(row, image_dir, origin)
        except GQAFormatError as err:
            if bad_rows is None:
                raise
            bad_rows.append({"id": qid, "origin": origin, "error": str(err)})
            continue
        stripped = {c: row[c].strip() for c in ("question_id", "img_id", "question", "answer")}
        keep.append({**row, **stripped, "image_path": path, "box": box, "origin": origin})
    columns = next((list(row) for _, _, row in rows if isinstance(row, dict)), [])
    return pd.DataFrame(keep, columns=[*columns, "image_path", "box", "origin"])


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
