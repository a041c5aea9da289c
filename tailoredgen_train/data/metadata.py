"""Read a dataset's metadata.jsonl or metadata.csv into rows of (file_name, caption).

Only the *structure* of the metadata file is checked here (a line that is not JSON, a CSV row
with the wrong number of fields, a missing file_name); everything about a single entry (its path,
its caption, its image) is judged by preflight so that every bad file is reported together.
If both files exist, metadata.jsonl wins and metadata.csv is ignored.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tailoredgen_train import strict_json
from tailoredgen_train.errors import DatasetInvalidError

logger = logging.getLogger(__name__)

JSONL_NAME = "metadata.jsonl"
CSV_NAME = "metadata.csv"
_FORMAT_HELP = (
    "A dataset is a folder of images plus metadata.jsonl with one line per image, "
    '{"file_name": "<path relative to the folder>", "caption": "<caption>"}, '
    "or metadata.csv with a header row file_name,caption and one quoted row per image."
)


@dataclass(frozen=True)
class MetadataRow:
    """One metadata entry. `caption` is None when the entry has no caption (or a null one)."""

    file_name: str
    caption: str | None
    source: str  # "metadata.jsonl:3": metadata file name and 1-based line number


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: `file` is the image's file_name or the metadata file."""

    file: str
    reason: str
    detail: str
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_metadata(dataset_dir: Path) -> list[MetadataRow]:
    """Read metadata.jsonl (preferred) or metadata.csv from `dataset_dir`.

    Raises DatasetInvalidError when neither exists, when the file is not UTF-8, or listing every
    structurally broken line (not JSON, not an object, no string file_name, wrong CSV field count).
    """
    dataset_dir = Path(dataset_dir)
    jsonl, csv_path = dataset_dir / JSONL_NAME, dataset_dir / CSV_NAME
    if jsonl.is_file():
        if csv_path.exists():
            logger.warning("%s has both %s and %s; using %s", dataset_dir, JSONL_NAME, CSV_NAME, JSONL_NAME)
        return _read_jsonl(jsonl)
    if csv_path.is_file():
        return _read_csv(csv_path)
    raise DatasetInvalidError(f"No {JSONL_NAME} or {CSV_NAME} found in {dataset_dir}. {_FORMAT_HELP}")


def _read_text(path: Path) -> str:
    """Decode a metadata file as UTF-8 (a BOM is tolerated), with the line of any bad byte."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetInvalidError(
            f"Cannot read {path} ({e.strerror}): give the user running the engine read access to it.",
            [Problem(path.name, "unreadable", f"cannot read the file ({e.strerror})", path.name)],
        ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DatasetInvalidError(
            f"{path.name} is not valid UTF-8 (bad byte 0x{data[e.start]:02x} on line {line}). "
            "Save it as UTF-8 and try again.",
            [Problem(path.name, "not_utf8", f"bad byte 0x{data[e.start]:02x}", f"{path.name}:{line}")],
        ) from None


def _raise_if_broken(path: Path, problems: list[Problem]) -> None:
    """Raise one error naming every structurally broken line of a metadata file."""
    if not problems:
        return
    lines = "\n".join(f"  {p.source}: {p.detail}" for p in problems)
    raise DatasetInvalidError(f"{path.name} has {len(problems)} malformed line(s):\n{lines}\n{_FORMAT_HELP}", problems)


# Marks a caption of a type that cannot be a caption (number, boolean).
_INVALID: Any = object()


def _caption_value(value: Any) -> Any:
    """A string or null caption as is; an inline JSON object/array as its JSON text; else _INVALID."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        # Accept a structured caption written inline rather than as a JSON string.
        return json.dumps(value, separators=(",", ":"))
    return _INVALID


def _read_jsonl(path: Path) -> list[MetadataRow]:
    rows: list[MetadataRow] = []
    problems: list[Problem] = []
    # split("\n"), not splitlines(): JSON strings may legally hold U+2028 and other line separators.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        source = f"{path.name}:{number}"
        if not line.strip():
            continue  # blank lines are harmless
        try:
            entry = strict_json.loads(line)
        except ValueError as e:
            problems.append(Problem(path.name, "malformed_metadata", f"line {number} is not valid JSON ({e})", source))
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            problems.append(
                Problem(
                    path.name,
                    "malformed_metadata",
                    f'line {number} must be a JSON object with a string "file_name" (and a "caption")',
                    source,
                )
            )
            continue
        caption = _caption_value(entry.get("caption"))
        if caption is _INVALID:
            detail = f'line {number}: "caption" must be a string (or an inline JSON object)'
            problems.append(Problem(path.name, "malformed_metadata", detail, source))
            continue
        rows.append(MetadataRow(entry["file_name"], caption, source))
    _raise_if_broken(path, problems)
    return rows


def _read_csv(path: Path) -> list[MetadataRow]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    rows: list[MetadataRow] = []
    problems: list[Problem] = []
    previous_end = 0
    try:
        header = next(reader, None)
        previous_end = reader.line_num
        if header is None or "file_name" not in [h.strip() for h in header]:
            raise DatasetInvalidError(
                f'{path.name} must start with a header row naming a "file_name" column (file_name,caption). '
                + _FORMAT_HELP
            )
        columns = [h.strip() for h in header]
        name_col = columns.index("file_name")
        caption_col = columns.index("caption") if "caption" in columns else None
        for record in reader:
            # A record may span lines (quoted newlines); its source is the line where it starts.
            number, previous_end = previous_end + 1, reader.line_num
            if not record:
                continue
            source = f"{path.name}:{number}"
            if len(record) > len(columns):
                problems.append(
                    Problem(
                        path.name,
                        "malformed_metadata",
                        f"line {number} has {len(record)} fields but the header has {len(columns)}; "
                        'quote captions that contain commas ("..." with inner quotes doubled)',
                        source,
                    )
                )
                continue
            caption = record[caption_col] if caption_col is not None and caption_col < len(record) else None
            file_name = record[name_col] if name_col < len(record) else ""
            rows.append(MetadataRow(file_name, caption, source))
    except csv.Error as e:
        source = f"{path.name}:{reader.line_num}"
        problems.append(Problem(path.name, "malformed_metadata", f"CSV error near line {reader.line_num}: {e}", source))
    _raise_if_broken(path, problems)
    return rows
