"""Files the service imports by reference, and the checks a zip passes before any member is read.

A reference is an http(s) URL, downloaded with a size cap, or an absolute path under one of the
operator's `serve --import-root` folders (none by default, so a path is refused with the flag that
enables it). A zip is refused as a whole when any member has an unsafe name (absolute, `..`, a
backslash or a drive), is a link or a device, is encrypted, is larger than an image may be, or
expands more than MAX_RATIO times (a zip bomb); nothing of such a zip is read. Its members are
never written under their own names: the images go through the dataset's upload path, which names
every stored file itself.
"""

from __future__ import annotations

import os
import stat
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from ..errors import InvalidParameterError, TailoredGenError
from .datasets import UploadTooLargeError

FETCH_TIMEOUT_S = 1800.0
MAX_RATIO = 100
"""the most a member may expand (images barely compress; a bomb expands thousands of times)"""
RATIO_FLOOR_BYTES = 2**20
"""members smaller than this pass the ratio check (tiny text files compress well and harm nothing)"""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_FILES = ("metadata.jsonl", "metadata.csv")


class ZipRefusedError(TailoredGenError):
    """A zip refused as a whole (400): not a zip, or a member that could escape, expand or deceive."""

    code = "zip_refused"
    http_status = 400


@dataclass(frozen=True)
class Source:
    """What a request's `field` named: a URL to download, or a file on this server."""

    field: str
    url: str | None = None
    path: Path | None = None

    def describe(self) -> str:
        return self.url.split("?")[0] if self.url else str(self.path)


def resolve_source(value: str, field_name: str, roots: list[Path], max_bytes: int) -> Source:
    """An http(s) URL, or an absolute path to a regular file inside one of `roots` (after every
    symlink is resolved) no larger than `max_bytes`; else a 400 naming the field, or a 413."""
    scheme = urlsplit(value).scheme.lower()
    if scheme in ("http", "https"):
        return Source(field_name, url=value)
    if scheme and len(scheme) > 1:  # "c:" is a Windows drive, not a scheme; every other scheme is refused
        raise _bad(field_name, value, f"the {scheme}: scheme is not fetched; send an http(s) URL")
    if not roots:
        raise _bad(field_name, value, "this server imports no server paths: send an http(s) URL, or ask the operator "
                                      "to allow a folder with `serve --import-root DIR`")
    path = Path(value)
    try:
        resolved = path.resolve(strict=True) if path.is_absolute() else None
    except (OSError, RuntimeError):
        resolved = None
    if resolved is None or not any(resolved.is_relative_to(root.resolve()) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise _bad(field_name, value, f"not an existing absolute path inside the server's import folders ({allowed})")
    if not resolved.is_file():
        raise _bad(field_name, value, "not a regular file")
    size = resolved.stat().st_size
    if size > max_bytes:
        raise UploadTooLargeError(f"{field_name}: the file is {size} bytes; the most accepted is {max_bytes}")
    return Source(field_name, path=resolved)


def fetch(source: Source, staging: Path, max_bytes: int) -> Path:
    """The local file of `source`: its path, or the URL downloaded into `staging` (at most
    `max_bytes`, written and fsynced; the caller removes it)."""
    if source.path is not None:
        return source.path
    import httpx

    deadline = time.monotonic() + FETCH_TIMEOUT_S
    written = 0
    try:
        with httpx.Client(timeout=60, follow_redirects=True, max_redirects=3) as client, \
                client.stream("GET", source.url) as response, open(staging, "wb") as handle:
            if response.status_code != 200:
                raise _bad(source.field, source.url, f"fetching it answered HTTP {response.status_code}")
            if urlsplit(str(response.url)).scheme not in ("http", "https"):
                raise _bad(source.field, source.url, "it redirected to a scheme other than http(s)")
            for chunk in response.iter_bytes(2**20):
                written += len(chunk)
                if written > max_bytes:
                    raise UploadTooLargeError(f"{source.field}: the download is larger than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise _bad(source.field, source.url, f"the download took more than {FETCH_TIMEOUT_S:.0f} s")
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
    except httpx.HTTPError as exc:
        raise _bad(source.field, source.url, f"cannot fetch it: {type(exc).__name__}") from None
    return staging


@dataclass
class ZipPlan:
    """What a checked zip holds: its images, and the caption files next to them."""

    images: list[zipfile.ZipInfo] = field(default_factory=list)
    text_captions: dict[str, zipfile.ZipInfo] = field(default_factory=dict)
    """`folder/stem` -> its `folder/stem.txt` member"""
    metadata: dict[str, zipfile.ZipInfo] = field(default_factory=dict)
    """folder ('' for the root) -> its metadata.jsonl or metadata.csv member"""


def check_zip(archive: zipfile.ZipFile, *, max_images: int, max_member_bytes: int,
              max_total_bytes: int) -> ZipPlan:
    """Read the zip's directory (no member's data) and refuse it as a whole if anything is unsafe."""
    plan = ZipPlan()
    members = archive.infolist()
    if len(members) > 4 * max_images + 1000:
        raise ZipRefusedError(f"the zip has {len(members)} entries; a bulk upload holds at most {max_images} images "
                              "and their caption files")
    seen: set[str] = set()
    total = 0
    for info in members:
        name = info.filename
        _check_member(info)
        if name in seen:
            raise ZipRefusedError(f"the zip holds {name!r} twice")
        seen.add(name)
        if info.is_dir():
            continue
        if info.file_size > max_member_bytes:
            raise ZipRefusedError(f"{name!r} expands to {info.file_size} bytes; a member may hold at most "
                                  f"{max_member_bytes}")
        if info.file_size > RATIO_FLOOR_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise ZipRefusedError(f"{name!r} expands {info.file_size // max(info.compress_size, 1)} times (zip bomb?); "
                                  f"a member may expand at most {MAX_RATIO} times")
        total += info.file_size
        if total > max_total_bytes:
            raise ZipRefusedError(f"the zip expands to more than {max_total_bytes} bytes")
        path = PurePosixPath(name)
        if any(part.startswith(".") or part == "__MACOSX" for part in path.parts):
            continue  # hidden files and macOS resource forks are not images
        folder = str(path.parent) if str(path.parent) != "." else ""
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            plan.images.append(info)
        elif suffix == ".txt":
            plan.text_captions[str(path.with_suffix(""))] = info
        elif path.name in CAPTION_FILES and (path.name == CAPTION_FILES[0] or folder not in plan.metadata):
            plan.metadata[folder] = info  # metadata.jsonl wins over metadata.csv, as in a dataset folder
    if len(plan.images) > max_images:
        raise ZipRefusedError(f"the zip holds {len(plan.images)} images; a bulk upload takes at most {max_images}")
    if not plan.images:
        raise ZipRefusedError(f"the zip holds no image ({', '.join(IMAGE_SUFFIXES)})")
    return plan


def _check_member(info: zipfile.ZipInfo) -> None:
    name = info.filename
    parts = PurePosixPath(name).parts
    if (name.startswith("/") or "\\" in name or ".." in parts or "\x00" in name
            or (parts and len(parts[0]) == 2 and parts[0][1] == ":")):
        raise ZipRefusedError(f"the zip member {name[:200]!r} has an unsafe name (an absolute path, '..', a "
                              "backslash or a drive): refused, nothing was extracted")
    kind = stat.S_IFMT(info.external_attr >> 16)  # Unix file type bits (0 when the zip records none)
    if info.create_system == 3 and kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        what = "a symbolic link" if kind == stat.S_IFLNK else "not a regular file"
        raise ZipRefusedError(f"the zip member {name[:200]!r} is {what}: refused, nothing was extracted")
    if info.flag_bits & 0x1:
        raise ZipRefusedError(f"the zip member {name[:200]!r} is encrypted")


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, never more than `limit` (+1, so that the caller sees it was larger)."""
    with archive.open(info) as handle:
        return handle.read(limit + 1)


def _bad(field_name: str, value: str, message: str) -> InvalidParameterError:
    return InvalidParameterError.single(field_name, value[:200], message)
