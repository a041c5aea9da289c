"""Generated images on disk: one PNG each, a captioned grid, and what made each image."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .. import strict_json
from .generate import GeneratedImage

GRID_COLUMNS = 4
LABEL_LINES = 4
LABEL_CHARS = 160  # a prompt without a short_description is cut to this


def prompt_label(prompt: str) -> str:
    """What a grid shows under an image: a JSON prompt's short_description, else the text, cut short."""
    try:
        obj = strict_json.loads(prompt)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("short_description"), str) and obj["short_description"].strip():
        text = obj["short_description"].strip()
    else:
        text = " ".join(prompt.split())
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 3] + "..."


def sample_grid(images: list[GeneratedImage]) -> Image.Image:
    """Images in rows of up to GRID_COLUMNS, each with its prompt's label wrapped underneath."""
    if not images:
        raise ValueError("sample_grid needs at least one image")
    cell_w = max(item.image.width for item in images)
    cell_h = max(item.image.height for item in images)
    font = ImageFont.load_default(size=max(10, min(24, cell_w // 20)))
    char_w = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
    line_h = int(font.size * 1.25)
    labels = [textwrap.wrap(f"{prompt_label(item.prompt)} (seed {item.seed})", max_lines=LABEL_LINES,
                            width=max(8, int((cell_w - 8) / char_w)), placeholder=" ...") for item in images]
    label_h = max(len(lines) for lines in labels) * line_h + 8
    columns = min(GRID_COLUMNS, len(images))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (item, lines) in enumerate(zip(images, labels)):
        x, y = (i % columns) * cell_w, (i // columns) * (cell_h + label_h)
        grid.paste(item.image.convert("RGB"), (x, y))
        for n, line in enumerate(lines):
            draw.text((x + 4, y + cell_h + 4 + n * line_h), line, fill="black", font=font)
    return grid


def write_samples(directory: Path, images: list[GeneratedImage]) -> list[Path]:
    """`00.png, 01.png, ...`, `grid.png` and `prompts.json` (prompt, seed, file per image) into
    `directory`, which is created; the caller decides about atomicity (e.g. a staging folder).
    Returns the paths written, images first."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    digits = max(2, len(str(len(images) - 1)))
    paths, records = [], []
    for i, item in enumerate(images):
        path = directory / f"{i:0{digits}d}.png"
        item.image.save(path)
        paths.append(path)
        records.append({"file": path.name, "prompt": item.prompt, "seed": item.seed})
    grid = directory / "grid.png"
    sample_grid(images).save(grid)
    index = directory / "prompts.json"
    index.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    return [*paths, grid, index]
