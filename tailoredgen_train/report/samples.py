"""The sample renders of a run folder, and JPEG thumbnails of their grids for the report.

    OUTPUT/samples/step-0/                 the baseline, before training
    OUTPUT/samples/step-<N>/               renders between checkpoints
    OUTPUT/checkpoint-<N>/samples/         renders of a published checkpoint
each holding 00.png, 01.png, ..., grid.png and prompts.json ([{"file", "prompt", "seed"}, ...]).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

GRID_FILE, PROMPTS_FILE = "grid.png", "prompts.json"
_STEP_FOLDER = re.compile(r"^step-(\d+)$")
_CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")
_IMAGE_FILE = re.compile(r"^\d+\.png$")
# (file, mtime, size, max_side, quality) -> JPEG: a page rebuilt at each checkpoint encodes only the new renders
_thumbnails: dict[tuple, bytes | None] = {}
_MAX_CACHED = 512


@dataclass(frozen=True)
class Render:
    step: int
    kind: Literal["baseline", "checkpoint", "validation"]
    folder: Path


def _has_images(folder: Path) -> bool:
    return (folder / GRID_FILE).is_file() or any(_IMAGE_FILE.match(p.name) for p in folder.iterdir())


def find_renders(run_dir: str | Path) -> list[Render]:
    """Every render folder holding images, in step order (a checkpoint's own renders win over a
    samples/step-N folder of the same step)."""
    run_dir = Path(run_dir)
    found: dict[int, Render] = {}
    candidates = []
    if (run_dir / "samples").is_dir():
        candidates += [(m, path, "validation") for path in (run_dir / "samples").iterdir()
                       if (m := _STEP_FOLDER.match(path.name))]
    if run_dir.is_dir():
        candidates += [(m, path / "samples", "checkpoint") for path in run_dir.iterdir()
                       if (m := _CHECKPOINT_FOLDER.match(path.name))]
    for match, folder, kind in candidates:
        step = int(match.group(1))
        try:
            if not folder.is_dir() or not _has_images(folder):
                continue
        except OSError:
            continue  # vanished while we looked (a rename in progress)
        if kind == "validation" and step == 0:
            kind = "baseline"
        if step not in found or kind == "checkpoint":
            found[step] = Render(step=step, kind=kind, folder=folder)
    return [found[s] for s in sorted(found)]


def read_prompts(folder: Path) -> list[dict[str, Any]]:
    try:
        prompts = json.loads((folder / PROMPTS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [p for p in prompts if isinstance(p, dict)] if isinstance(prompts, list) else []


def _open_rgb(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "P"):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, "white")
                return Image.alpha_composite(background, image).convert("RGB")
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None  # half-written or not an image


def _contact_sheet(folder: Path, cell: int = 256, columns: int = 4) -> Image.Image | None:
    """A grid from the numbered images, for a folder whose grid.png is missing."""
    images = [im for path in sorted(folder.iterdir()) if _IMAGE_FILE.match(path.name)
              if (im := _open_rgb(path)) is not None]
    if not images:
        return None
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * cell), "white")
    for index, image in enumerate(images):
        image.thumbnail((cell, cell))
        x, y = (index % columns) * cell, (index // columns) * cell
        sheet.paste(image, (x + (cell - image.width) // 2, y + (cell - image.height) // 2))
    return sheet


def grid_thumbnail(folder: Path, max_side: int, quality: int = 80) -> bytes | None:
    """The folder's grid as a JPEG no larger than max_side; None when nothing in it can be read."""
    grid = folder / GRID_FILE
    try:
        source = grid if grid.is_file() else folder
        stat = source.stat()
    except OSError:
        return None
    key = (str(source), stat.st_mtime_ns, stat.st_size, max_side, quality)
    if key in _thumbnails:
        return _thumbnails[key]
    image = _open_rgb(grid) if source == grid else None
    if image is None:
        image = _contact_sheet(folder)
    data = None
    if image is not None:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        data = buffer.getvalue()
    if len(_thumbnails) >= _MAX_CACHED:
        _thumbnails.clear()
    if data is not None or source != grid:  # a grid that failed to decode may still be being written
        _thumbnails[key] = data
    return data
