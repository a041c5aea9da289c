"""Dataset thumbnails: made once per image file (PIL, at most 256 px, JPEG) and kept under
DATA_DIR/thumbnails/dataset-<id>/. The name carries the source file's size and modification time,
so a changed image gets a new thumbnail and the old one is removed."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from PIL import Image as PILImage

from ...data.images import load_rgb
from ..core import Service
from ..db import Image

THUMBNAIL_SIDE = 256


def thumbnail_dir(service: Service, dataset_id: int) -> Path:
    return service.settings.data_dir / "thumbnails" / f"dataset-{dataset_id}"


def thumbnail(service: Service, image: Image) -> Path:
    """The image's thumbnail, made now if it does not exist for the image file as it is now."""
    source = service.dataset_dir(image.dataset_id) / image.file_name
    stat = source.stat()
    stem = Path(image.file_name).stem
    folder = thumbnail_dir(service, image.dataset_id)
    path = folder / f"{stem}-{stat.st_size}-{stat.st_mtime_ns}.jpg"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    # what training sees: EXIF-rotated, alpha on black, 8-bit RGB
    picture = load_rgb(source)
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), PILImage.Resampling.LANCZOS)
    staging = folder / f".{path.name}.{uuid.uuid4().hex}.partial"
    with open(staging, "wb") as handle:
        picture.save(handle, format="JPEG", quality=85)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    for old in folder.glob(f"{stem}-*.jpg"):  # thumbnails of the file's earlier contents
        if old != path:
            old.unlink(missing_ok=True)
    return path
