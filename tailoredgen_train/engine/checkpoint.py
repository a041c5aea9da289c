"""Checkpointer: `OUTPUT/checkpoint-<step>/` folders that are complete or absent, never half-written.

Layout of one checkpoint:
    pytorch_lora_weights.safetensors   the published LoRA (the family's pipeline loads it)
    resume/optimizer.pt                optimizer state (tensors only: loads with weights_only=True)
    resume/state.json                  step, data cursor, LR-scheduler state, what must match to resume
    manifest.json                      written last: size and sha256 of every other file

Files are written into a staging folder, fsynced, the manifest goes in last, and the folder is
renamed into place. A checkpoint counts only if its manifest verifies, so "latest" is the newest
checkpoint that verifies, never just the highest number.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

LORA_FILE = "pytorch_lora_weights.safetensors"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """save(step, write) / latest() / verify(path). Only the main process writes."""

    def __init__(self, output_dir: Path, *, is_main_process: bool = True):
        self.output_dir = Path(output_dir)
        self.is_main_process = is_main_process

    def path_for(self, step: int) -> Path:
        return self.output_dir / f"checkpoint-{step}"

    def save(self, step: int, write: Callable[[Path], None], *, extra_manifest: dict | None = None) -> Path:
        """`write(staging_dir)` puts the files in; this makes them durable and publishes them atomically."""
        final = self.path_for(step)
        if not self.is_main_process:
            return final
        self.output_dir.mkdir(parents=True, exist_ok=True)
        staging = self.output_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        write(staging)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "files": {str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
            **(extra_manifest or {}),
        }
        for p in files:
            _fsync(p)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _fsync(staging / MANIFEST)
        if final.exists():  # a rerun of the same step: swap, so a valid copy exists at every moment
            retired = self.output_dir / f".checkpoint-{step}.old-{os.getpid()}"
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired)
        else:
            os.replace(staging, final)
        _fsync(self.output_dir)
        return final

    @staticmethod
    def verify(path: Path) -> bool:
        """True when the manifest exists and every listed file has its recorded size and sha256."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            for name, meta in manifest["files"].items():
                file = path / name
                if file.stat().st_size != meta["bytes"] or _sha256(file) != meta["sha256"]:
                    return False
            return LORA_FILE in manifest["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def steps(self) -> list[int]:
        """Steps of the checkpoint folders present, newest first (verified or not)."""
        if not self.output_dir.is_dir():
            return []
        found = [int(m.group(1)) for p in self.output_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
        return sorted(found, reverse=True)

    def latest(self) -> Path | None:
        """The newest checkpoint whose manifest verifies; damaged ones are skipped with a warning."""
        for step in self.steps():
            path = self.path_for(step)
            if self.verify(path):
                return path
            log.warning("skipping %s: its manifest is missing or does not match its files", path)
        return None
