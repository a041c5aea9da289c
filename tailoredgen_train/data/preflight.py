"""Validate a dataset folder before training, read-only, reporting every bad file at once."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from tailoredgen_train.data.caption_format import CAPTION_FORMAT_HINT, has_known_field, unknown_fields
from tailoredgen_train.data.captions import apply_caption_prefix, normalize_json_caption, normalize_text_caption
from tailoredgen_train.data.images import IMAGE_EXTENSIONS, ImageProblem, has_image_extension, load_rgb
from tailoredgen_train.data.metadata import CSV_NAME, JSONL_NAME, MetadataRow, Problem, read_metadata
from tailoredgen_train.errors import DatasetInvalidError

__all__ = ["PreflightReport", "Problem", "Sample", "validate_dataset"]


@dataclass(frozen=True)
class Sample:
    """One valid training example."""

    sample_id: str  # the file_name as a normalised relative posix path
    image_path: Path
    caption: str  # compact JSON for caption_format "json", stripped (and prefixed) text for "text"
    content_hash: str  # sha256 hex of the image file's bytes
    width: int  # after EXIF orientation
    height: int


@dataclass
class PreflightReport:
    """What validate_dataset found: the usable samples and every problem."""

    dataset_dir: Path
    samples: list[Sample]
    problems: list[Problem]
    notes: list[Problem] = field(default_factory=list)
    """Usable images that were converted on load (reason = what was done), for the user to see."""

    @property
    def ok(self) -> bool:
        """True when there are no problems and at least one sample."""
        return not self.problems and bool(self.samples)

    def format(self) -> str:
        """One line per problem, `file: reason — detail (source)`, then a summary line."""
        lines = [
            f"{p.file}: {p.reason} — {p.detail}" + (f" ({p.source})" if p.source else "") for p in self.problems
        ]
        lines += [f"{n.file}: note {n.reason} — {n.detail}" for n in self.notes]
        lines.append(f"{len(self.samples)} valid images, {len(self.problems)} problems")
        return "\n".join(lines)

    def raise_if_invalid(self) -> None:
        """Raise DatasetInvalidError listing every problem unless the report is ok."""
        if self.ok:
            return
        raise DatasetInvalidError(
            f"The dataset at {self.dataset_dir} failed validation: fix or remove each file listed below "
            f"(and its metadata line), then start training again.\n{self.format()}",
            problems=list(self.problems),
        )


def validate_dataset(
    dataset_dir: str | Path,
    *,
    caption_format: Literal["json", "text"],
    min_side: int,
    max_pixels: int = 64_000_000,
    caption_prefix: str | None = None,
) -> PreflightReport:
    """Check every metadata entry and every image in `dataset_dir` without writing anything.

    Each image is decoded fully once. Files with a problem contribute no Sample; all problems are
    collected (see the module's reason codes). Raises DatasetInvalidError when the folder or its
    metadata file is missing or malformed, ValueError for bad arguments (a caption_prefix with
    caption_format "json", since FIBO's structured captions have no prefix).
    """
    if caption_format not in ("json", "text"):
        raise ValueError(f'caption_format must be "json" or "text", got {caption_format!r}')
    if caption_format == "json" and caption_prefix:
        raise ValueError("caption_prefix is only supported with caption_format='text' (FIBO captions are JSON)")
    if min_side < 1:
        raise ValueError(f"min_side must be >= 1, got {min_side}")
    root = Path(dataset_dir)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DatasetInvalidError(f"Dataset folder {root} {what}: pass a folder of images with metadata.jsonl "
                                  "(or metadata.csv).")

    rows = read_metadata(root)
    samples: list[Sample] = []
    problems: list[Problem] = []
    notes: list[Problem] = []
    seen: dict[str, str] = {}  # sample_id -> source of its first row
    for row in rows:
        sample_id = _sample_id(row.file_name)
        if sample_id is None:
            problems.append(
                Problem(
                    row.file_name,
                    "bad_file_name",
                    "file_name must be a relative path inside the dataset folder using '/' "
                    "(no absolute path, no '..', no backslash)",
                    row.source,
                )
            )
            continue
        if sample_id in seen:
            problems.append(
                Problem(
                    sample_id,
                    "duplicate_entry",
                    f"this file already has a metadata entry at {seen[sample_id]}; keep one line per image",
                    row.source,
                )
            )
            continue
        seen[sample_id] = row.source
        result = _check_row(root, sample_id, row, caption_format, min_side, max_pixels, caption_prefix, notes)
        if isinstance(result, Sample):
            samples.append(result)
        else:
            problems.extend(result)

    for sample_id in _image_files(root):
        if sample_id not in seen:
            problems.append(
                Problem(
                    sample_id,
                    "missing_caption",
                    f"the image has no metadata entry; add a line for it to {JSONL_NAME} "
                    f'({{"file_name": "{sample_id}", "caption": ...}}) or delete it',
                    None,
                )
            )
    if not rows and not problems:
        metadata_name = JSONL_NAME if (root / JSONL_NAME).is_file() else CSV_NAME
        problems.append(Problem(metadata_name, "empty_dataset", "the metadata lists no images; add at least one", None))
    samples.sort(key=lambda s: s.sample_id)
    return PreflightReport(dataset_dir=root, samples=samples, problems=problems, notes=notes)


def _sample_id(file_name: str) -> str | None:
    """Normalised relative posix path for a metadata file_name, or None when it is unsafe."""
    if not file_name or "\\" in file_name or "\0" in file_name:
        return None
    path = PurePosixPath(file_name)
    # A drive letter ("C:/x.png") is absolute on Windows even though posix calls it relative.
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        return None
    sample_id = str(path)
    return None if sample_id in ("", ".") else sample_id


def _check_row(
    root: Path,
    sample_id: str,
    row: MetadataRow,
    caption_format: str,
    min_side: int,
    max_pixels: int,
    caption_prefix: str | None,
    notes: list[Problem],
) -> Sample | list[Problem]:
    """Validate one entry's image and caption; both are reported so one pass fixes everything."""
    image_path = root / sample_id
    conversions: list[str] = []
    size = _check_image(image_path, sample_id, min_side, max_pixels, conversions)
    notes.extend(Problem(sample_id, code, _NOTE_DETAILS[code], row.source) for code in conversions)
    caption_notes: list[str] = []
    caption = _check_caption(row.caption, caption_format, caption_prefix, caption_notes)
    notes.extend(Problem(sample_id, "unknown_caption_field", detail, row.source) for detail in caption_notes)
    if isinstance(size, _Reject) or isinstance(caption, _Reject):
        return [Problem(sample_id, p.reason, p.detail, row.source) for p in (size, caption) if isinstance(p, _Reject)]
    width, height = size
    return Sample(sample_id, image_path, caption, _sha256(image_path), width, height)


@dataclass(frozen=True)
class _Reject:
    """Why one image or caption cannot be used."""

    reason: str
    detail: str


_NOTE_DETAILS = {
    "exif_rotated": "rotated upright by its EXIF orientation",
    "alpha_on_black": "transparent pixels composited onto black (Bria's rule for transparent backgrounds)",
    "cmyk_converted": "CMYK converted to RGB",
    "high_bit_depth_scaled": "more than 8 bits per channel, scaled (not clipped) to 8 bits",
    "first_frame_only": "animated image: only the first frame is used",
}


def _check_image(
    image_path: Path, sample_id: str, min_side: int, max_pixels: int, conversions: list[str]
) -> tuple[int, int] | _Reject:
    """The oriented (width, height) of a usable image, or why it is unusable."""
    if not image_path.is_file():
        return _Reject("missing_file", "no such file in the dataset folder; add it or remove its metadata line")
    if not has_image_extension(sample_id):
        return _Reject("unsupported_format", f"only {', '.join(IMAGE_EXTENSIONS)} images are supported")
    try:
        image = load_rgb(image_path, max_pixels=max_pixels, notes=conversions)
    except ImageProblem as e:
        return _Reject(e.reason, e.detail)
    width, height = image.size
    image.close()  # preflight keeps only the size; the trainer decodes again when it needs pixels
    if min(width, height) < min_side:
        return _Reject(
            "too_small",
            f"image is {width}x{height} but its shorter side must be at least {min_side} pixels; "
            "use a larger image or a lower data.min_side",
        )
    return width, height


def _check_caption(
    caption: str | None, caption_format: str, caption_prefix: str | None, notes: list[str]
) -> str | _Reject:
    """The normalised caption, or why it is unusable; what is odd but usable goes to `notes`."""
    if caption is None:
        return _Reject("missing_caption", 'the metadata entry has no "caption"; add one')
    if not caption.strip():
        return _Reject("empty_caption", "the caption is empty; write a caption for this image")
    if caption_format == "json":
        try:
            text = normalize_json_caption(caption)
        except ValueError as e:
            return _Reject("invalid_json", f"{e}. {CAPTION_FORMAT_HINT}")
        fields = json.loads(text)
        if not has_known_field(fields):
            names = ", ".join(repr(k) for k in list(fields)[:5]) or "none"
            return _Reject("not_a_fibo_caption", f"none of its fields ({names}) is a FIBO caption field such as "
                           f"short_description, objects or lighting. {CAPTION_FORMAT_HINT}")
        notes.extend(unknown.describe() for unknown in unknown_fields(fields))
        return text
    try:
        text = normalize_text_caption(caption)
    except ValueError as e:
        return _Reject("invalid_caption", str(e))
    return apply_caption_prefix(text, caption_prefix)


def _sha256(path: Path) -> str:
    """sha256 hex of a file's bytes, streamed so large images do not double memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _image_files(root: Path) -> list[str]:
    """Relative posix paths of image files under root, skipping dotfiles and dot-directories."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if not name.startswith(".") and has_image_extension(name):
                found.append((rel / name).as_posix())
    return found
