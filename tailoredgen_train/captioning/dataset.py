"""Caption a dataset folder: every image without a caption gets one in metadata.jsonl.

Existing captions are kept unless `overwrite`. The images are only read. metadata.jsonl is rewritten
after every batch as a whole new file (staging file, fsync, rename, fsync of the folder), so a
kill at any moment leaves either the previous file or the next one, and a rerun continues with the
images that still have no caption. Other keys of a metadata line are kept as they are. A dataset
described by metadata.csv gets a metadata.jsonl (which then takes precedence); the CSV is left alone.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.images import ImageProblem, load_rgb
from ..data.metadata import CSV_NAME, JSONL_NAME, read_metadata
from ..data.preflight import _image_files, _sample_id
from ..errors import DatasetInvalidError
from .captioner import CaptionFormat, Captioner, CaptionResult

logger = logging.getLogger(__name__)
_STAGING_PREFIX = f".{JSONL_NAME}.tmp-"


@dataclass(frozen=True)
class CaptionFailure:
    file_name: str
    code: str  # caption_failed, oom, or the image's problem (corrupt, truncated, missing_file, ...)
    detail: str
    raw: str | None = None


@dataclass
class CaptionSummary:
    """What `caption_dataset` did, image by image."""

    metadata_path: Path
    captioned: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: list[CaptionFailure] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"{f.file_name}: {f.code} — {f.detail}" + (f"\n    raw output: {f.raw[:300]!r}" if f.raw else "")
                 for f in self.failed]
        lines.append(f"captioned {len(self.captioned)}, kept {len(self.kept)}, failed {len(self.failed)} "
                     f"({self.metadata_path})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"metadata_path": str(self.metadata_path), "captioned": self.captioned, "kept": self.kept,
                "failed": [asdict(f) for f in self.failed]}


def caption_dataset(dataset_dir: str | Path, captioner: Captioner | Callable[[], Captioner], *,
                    caption_format: CaptionFormat = "json", overwrite: bool = False, caption_prefix: str | None = None,
                    visual_schema: Mapping[str, Any] | None = None, seed: int = 0, batch_size: int | None = None,
                    progress: bool = True) -> CaptionSummary:
    """Caption every image of `dataset_dir` that has no caption yet (every image with `overwrite`).

    `captioner` may be a function that loads one: it is called only when an image needs a caption,
    so a rerun with nothing left to do loads no model. Batches are `batch_size` images (default the
    captioner's)."""
    root = Path(dataset_dir)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DatasetInvalidError(f"Dataset folder {root} {what}: point caption at a folder of images.")
    _remove_stale_staging(root)
    entries = _read_entries(root)
    summary = CaptionSummary(metadata_path=root / JSONL_NAME)
    targets: list[tuple[str, dict[str, Any] | None]] = []  # (sample id, its metadata entry or None if new)
    seen: set[str] = set()
    for entry in entries:
        sample_id = _sample_id(entry["file_name"])
        if sample_id is None or sample_id in seen:
            continue  # an unsafe or duplicate line: preflight reports it, captioning leaves it alone
        seen.add(sample_id)
        if _has_caption(entry.get("caption")) and not overwrite:
            summary.kept.append(sample_id)
        else:
            targets.append((sample_id, entry))
    targets += [(sample_id, None) for sample_id in _image_files(root) if sample_id not in seen]

    if not targets:
        return summary
    if not isinstance(captioner, Captioner):
        captioner = captioner()
    step = batch_size or captioner.batch_size
    bar = tqdm(total=len(targets), unit="img", desc="captioning", disable=not progress)
    for start in range(0, len(targets), step):
        batch = targets[start:start + step]
        images, ready = [], []
        for sample_id, entry in batch:
            try:
                images.append(load_rgb(root / sample_id))
                ready.append((sample_id, entry))
            except ImageProblem as e:
                summary.failed.append(CaptionFailure(sample_id, e.reason, e.detail))
        options = dict(caption_format=caption_format, visual_schema=visual_schema, caption_prefix=caption_prefix)
        results = _caption_batch(captioner, images, options, seed + start)
        for (sample_id, entry), result in zip(ready, results):
            if not result.ok:
                summary.failed.append(CaptionFailure(sample_id, result.code, result.detail, result.raw))
                continue
            if entry is None:
                entries.append({"file_name": sample_id, "caption": result.caption})
            else:
                entry["caption"] = result.caption
            summary.captioned.append(sample_id)
        if any(result.ok for result in results):
            write_metadata(root, entries)  # after every batch: an interrupted run keeps what it did
        bar.update(len(batch))
    bar.close()
    return summary


def _caption_batch(captioner: Captioner, images: list, options: dict[str, Any], seed: int) -> list[CaptionResult]:
    """A batch's results; a batch that runs out of accelerator memory is redone one image at a time,
    so that one large image fails alone instead of stopping the dataset."""
    if not images:
        return []
    try:
        return captioner.caption_images(images, seed=seed, **options)
    except torch.OutOfMemoryError:
        _free_memory()
    results = []
    for index, image in enumerate(images):
        try:
            results += captioner.caption_images([image], seed=seed + index, **options)
        except torch.OutOfMemoryError as e:
            _free_memory()
            results.append(CaptionResult(None, "oom", f"out of memory even alone: lower --max-pixels ({e})"))
    return results


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_metadata(root: Path, entries: list[dict[str, Any]]) -> Path:
    """Replace root/metadata.jsonl with `entries`, one JSON object a line, atomically."""
    target = root / JSONL_NAME
    staging = root / f"{_STAGING_PREFIX}{os.getpid()}"
    with open(staging, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(entry) + "\n" for entry in entries)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, target)
    directory = os.open(root, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)
    return target


def _read_entries(root: Path) -> list[dict[str, Any]]:
    """The metadata lines as dicts (all their keys), or [] for a folder of images only. A broken
    metadata file is refused (read_metadata lists its bad lines) rather than rewritten without them."""
    jsonl, csv_file = root / JSONL_NAME, root / CSV_NAME
    if not jsonl.is_file() and not csv_file.is_file():
        return []
    rows = read_metadata(root)
    if jsonl.is_file():
        text = jsonl.read_bytes().decode("utf-8-sig")
        return [json.loads(line) for line in text.split("\n") if line.strip()]
    logger.info("%s has %s only: captions go to a new %s, which is read from now on", root, CSV_NAME, JSONL_NAME)
    return [{"file_name": row.file_name, "caption": row.caption} for row in rows]


def _has_caption(caption: Any) -> bool:
    return bool(caption.strip()) if isinstance(caption, str) else bool(caption)


def _remove_stale_staging(root: Path) -> None:
    """Staging files of captioning runs that were killed before their rename."""
    for path in root.glob(f"{_STAGING_PREFIX}*"):
        pid = path.name[len(_STAGING_PREFIX):]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
