"""The JSON bodies the API returns, built from database rows (Bria's API docs: projects, datasets, models)."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from ..families import FAMILIES, family_class
from ..inference.validation import SAMPLES_DIR
from ..report import read_progress
from .db import Checkpoint, Dataset, Image, Model, Project

SAMPLE_FILE = re.compile(r"[A-Za-z0-9_-]{1,64}\.png")
"""What a sample image is named (00.png, grid.png): the only names the sample file route serves."""

# what GET /models/{id}/download names as the base, per model family (Bria's names); the card is
# the family's own hub_id
BASE_MODEL_NAMES = {"fibo": "BRIA-FIBO", "bria-3.2": "BRIA-3.2", "bria-2.3": "BRIA-2.3"}


def base_model_view(family: str) -> dict[str, str | None]:
    hub_id = getattr(family_class(family), "hub_id", None) if family in FAMILIES else None
    return {"base_model_name": BASE_MODEL_NAMES.get(family, family),
            "base_model_card": f"https://huggingface.co/{hub_id}" if hub_id else None}


def project_view(project: Project) -> dict[str, Any]:
    return {k: getattr(project, k) for k in (
        "id", "project_name", "project_description", "ip_name", "ip_description", "ip_medium", "ip_type",
        "training_version", "status", "created_at", "updated_at")}


def image_view(image: Image) -> dict[str, Any]:
    failed = image.caption_source == "failed"
    return {"id": image.id, "dataset_id": image.dataset_id, "image_name": image.image_name,
            "caption": image.caption, "caption_source": image.caption_source,
            "caption_error": {"code": image.caption_error_code, "message": image.caption_error} if failed else None,
            "width": image.width, "height": image.height, "created_at": image.created_at,
            "updated_at": image.updated_at}


def caption_counts(session: Session, dataset_id: int) -> dict[str, int]:
    """How many images the dataset has, how many wait for the captioning worker, and how many have
    a settled caption_source (manual, automatic or failed)."""
    images, pending, settled = session.execute(
        select(func.count(), func.count(case((Image.caption_source == "pending", 1))),
               func.count(case((Image.caption_source.in_(("manual", "automatic", "failed")), 1))))
        .where(Image.dataset_id == dataset_id)).one()
    return {"images": images, "pending": pending, "settled": settled}


def captions_update_status(counts: dict[str, int]) -> str:
    """Bria's dataset field: in_progress while any caption is pending; completed once none is and
    some image has a caption or a failed attempt (so that a poll for completed ends even when every
    caption failed); empty before that."""
    return "in_progress" if counts["pending"] else "completed" if counts["settled"] else "empty"


def dataset_view(session: Session, dataset: Dataset, *, images: list[Image] | None = None) -> dict[str, Any]:
    counts = caption_counts(session, dataset.id)
    body = {"id": dataset.id, "project_id": dataset.project_id, "name": dataset.name,
            "training_version": dataset.training_version, "caption_prefix": dataset.caption_prefix,
            "visual_schema": dataset.visual_schema, "status": dataset.status, "upload_type": dataset.upload_type,
            "captions_update_status": captions_update_status(counts), "images_count": counts["images"],
            "created_at": dataset.created_at, "updated_at": dataset.updated_at}
    if images is not None:
        body["images"] = [image_view(i) for i in images]
    return body


def checkpoint_steps(session: Session, model: Model) -> list[str]:
    """Published checkpoints as strings, newest first; fully_automated models expose none (Bria)."""
    if model.training_mode != "expert":
        return []
    steps = session.scalars(select(Checkpoint.step).where(Checkpoint.model_id == model.id)
                            .order_by(Checkpoint.step.desc()))
    return [str(s) for s in steps]


UPLOADED_STEP = 1
"""the one checkpoint of a model uploaded as a LoRA file (POST /models/upload_model)"""


def final_step(model: Model) -> int:
    """The checkpoint step of a Completed model's final LoRA: its training's last step, or an
    uploaded model's one checkpoint."""
    total = (model.training_parameters or {}).get("total_training_steps")
    return UPLOADED_STEP if total is None and model.dataset_id is None else int(total)


def model_view(session: Session, model: Model, *, include_training_parameters: bool = True) -> dict[str, Any]:
    body = {"id": model.id, "name": model.name, "description": model.description, "status": model.status,
            "dataset_id": model.dataset_id, "training_version": model.training_version,
            "training_mode": model.training_mode, "generation_prefix": model.generation_prefix,
            "project_id": model.project_id, "created_at": model.created_at, "updated_at": model.updated_at,
            "custom_metadata": model.custom_metadata, "active_model_version": model.active_model_version}
    if include_training_parameters:
        body["training_parameters"] = dict(model.training_parameters or {})
        body["checkpoint_steps"] = checkpoint_steps(session, model)
    if model.status == "Failed":
        body["error"] = {"code": model.error_code, "message": model.error_message}
    return body


def checkpoint_view(checkpoint: Checkpoint) -> dict[str, Any]:
    return {"checkpoint_step": checkpoint.step, "training_job_id": checkpoint.training_job_id,
            "created_at": checkpoint.created_at}


def progress_view(run_dir: Path, status: str) -> dict[str, Any] | None:
    """GET /models/{id}'s training_progress, from the tail of the run's metrics.jsonl; None before
    the first step is recorded."""
    progress = read_progress(run_dir)
    if progress is None:
        return None
    updated = progress["updated_at"]
    return {"current_step": progress["step"], "total_steps": progress["total_steps"], "last_loss": progress["loss"],
            "step_seconds": progress["step_seconds"],
            "eta_seconds": progress["eta_s"] if status in ("InProgress", "Stopping", "Completed") else None,
            "updated_at": None if updated is None else
            datetime.fromtimestamp(updated, timezone.utc).replace(tzinfo=None).isoformat()}


def queued_progress_view(position: int, total_steps: int | None) -> dict[str, Any]:
    """GET /models/{id}'s training_progress while its job waits for a free GPU slice."""
    return {"phase": "queued", "queue_position": position, "current_step": 0, "total_steps": total_steps,
            "last_loss": None, "step_seconds": None, "eta_seconds": None, "updated_at": None}


def checkpoint_samples(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """The validation images of a checkpoint, in order: {"file", "prompt", "seed"} from its
    samples/prompts.json (the PNGs themselves when that index is missing); files that are not
    there are left out."""
    folder = checkpoint_dir / SAMPLES_DIR
    try:
        records = json.loads((folder / "prompts.json").read_text())
    except (OSError, ValueError):
        records = [{"file": p.name} for p in sorted(folder.glob("*.png")) if p.name != "grid.png"]
    if not isinstance(records, list):
        return []
    samples = []
    for record in records:
        name = record.get("file") if isinstance(record, dict) else None
        if isinstance(name, str) and SAMPLE_FILE.fullmatch(name) and (folder / name).is_file():
            seed = record.get("seed")
            samples.append({"file": name, "prompt": record.get("prompt") if isinstance(record.get("prompt"), str)
                            else None, "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else None})
    return samples
