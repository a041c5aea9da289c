"""Write the tiny synthetic datasets shipped in tailoredgen_train/data/.

Deterministic (numpy + Pillow only, fixed seed): six simple scenes, each a coloured shape on a
gradient background. `sample_dataset/` has FIBO-style structured JSON captions; with
`--captions text`, `sample_dataset_text/` has the same images with plain captions for the legacy
versions, written to continue the caption prefix "A minimalist flat illustration of".

    python scripts/make_sample_dataset.py [--captions json|text] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

DATA_DIR = Path(__file__).resolve().parent.parent / "tailoredgen_train" / "data"
TEXT_CAPTION_PREFIX = "A minimalist flat illustration of"
SEED = 20240611
RGB = tuple[int, int, int]


class Scene(NamedTuple):
    file_name: str
    size: tuple[int, int]  # (width, height)
    shape: str  # circle, square or triangle
    colour: str
    rgb: RGB
    bg_start: str  # gradient colour at the top (vertical) or left (horizontal)
    bg_start_rgb: RGB
    bg_end: str
    bg_end_rgb: RGB
    axis: str  # "vertical" or "horizontal"


SCENES = [
    Scene("red_circle.png", (192, 192), "circle", "red", (220, 40, 40),
          "pale blue", (200, 225, 250), "white", (250, 250, 250), "vertical"),
    Scene("blue_square.jpg", (160, 240), "square", "blue", (40, 70, 210),
          "soft yellow", (250, 240, 180), "orange", (245, 170, 90), "vertical"),
    Scene("green_triangle.png", (240, 160), "triangle", "green", (40, 170, 70),
          "lavender", (215, 200, 240), "pale pink", (250, 215, 225), "horizontal"),
    Scene("yellow_circle.jpg", (176, 208), "circle", "yellow", (245, 210, 40),
          "deep navy", (20, 30, 80), "teal", (30, 120, 130), "vertical"),
    Scene("purple_square.png", (208, 176), "square", "purple", (130, 50, 170),
          "mint green", (200, 240, 215), "light grey", (225, 225, 225), "horizontal"),
    Scene("orange_triangle.jpg", (224, 160), "triangle", "orange", (240, 130, 30),
          "sky blue", (150, 200, 245), "dark blue", (40, 80, 160), "vertical"),
]  # fmt: skip


def gradient(size: tuple[int, int], start: RGB, end: RGB, axis: str) -> Image.Image:
    """A linear two-colour gradient, top-to-bottom ("vertical") or left-to-right ("horizontal")."""
    w, h = size
    t = np.linspace(0.0, 1.0, h if axis == "vertical" else w)[:, None]
    ramp = np.rint(np.array(start) * (1 - t) + np.array(end) * t).astype(np.uint8)  # (steps, 3)
    ramp = ramp[:, None, :] if axis == "vertical" else ramp[None, :, :]
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp, (h, w, 3))))


def place_shape(size: tuple[int, int], rng: np.random.Generator) -> tuple[tuple[int, int, int, int], str, str]:
    """A seeded box for the shape near the centre, with its caption location and relative size."""
    w, h = size
    side = int(min(w, h) * rng.uniform(0.4, 0.6))
    cx = w // 2 + int(rng.integers(-w // 8, w // 8 + 1))
    cy = h // 2 + int(rng.integers(-h // 8, h // 8 + 1))
    box = (cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2)
    vertical = "upper " if cy < h * 0.45 else "lower " if cy > h * 0.55 else ""
    horizontal = "left" if cx < w * 0.45 else "right" if cx > w * 0.55 else "center"
    location = "center" if not vertical and horizontal == "center" else f"{vertical}{horizontal}"
    return box, location, "medium" if side < min(w, h) * 0.5 else "large"


def caption(scene: Scene, location: str, relative_size: str) -> dict[str, Any]:
    """A compact FIBO-style structured caption for one scene."""
    direction = "top to bottom" if scene.axis == "vertical" else "left to right"
    return {
        "short_description": (
            f"A flat {scene.colour} {scene.shape} on a smooth {scene.bg_start} to {scene.bg_end} gradient background."
        ),
        "objects": [
            {
                "description": f"A single solid {scene.colour} {scene.shape} with crisp, clean edges.",
                "location": location,
                "relative_size": f"{relative_size} within frame",
                "shape_and_color": f"{scene.shape}, solid {scene.colour}",
            }
        ],
        "background_setting": f"A plain linear gradient from {scene.bg_start} to {scene.bg_end}, running {direction}.",
        "lighting": {"conditions": "flat, even digital lighting", "direction": "frontal, diffuse", "shadows": "none"},
        "aesthetics": {
            "composition": f"minimalist, single subject placed {location}",
            "color_scheme": f"{scene.colour} against {scene.bg_start} and {scene.bg_end}",
            "mood_atmosphere": "calm, simple, graphic",
        },
        "style_medium": "digital illustration",
        "artistic_style": "minimalist flat vector graphic",
    }


def text_caption(scene: Scene, location: str) -> str:
    """A plain caption that continues TEXT_CAPTION_PREFIX (Bria's legacy captions continue the prefix)."""
    return (f"a {scene.colour} {scene.shape} at the {location} of a smooth {scene.bg_start} to {scene.bg_end} "
            "gradient background")


def render(scene: Scene, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """The scene's image and its structured caption."""
    img = gradient(scene.size, scene.bg_start_rgb, scene.bg_end_rgb, scene.axis)
    box, location, relative_size = place_shape(scene.size, rng)
    draw = ImageDraw.Draw(img)
    if scene.shape == "circle":
        draw.ellipse(box, fill=scene.rgb)
    elif scene.shape == "square":
        draw.rectangle(box, fill=scene.rgb)
    else:
        x0, y0, x1, y1 = box
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=scene.rgb)
    return img, {"structured": caption(scene, location, relative_size), "text": text_caption(scene, location)}


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic sample dataset.")
    parser.add_argument("--captions", choices=("json", "text"), default="json")
    parser.add_argument("--out", type=Path, help="output folder (default tailoredgen_train/data/sample_dataset[_text])")
    args = parser.parse_args()
    out: Path = args.out or DATA_DIR / ("sample_dataset" if args.captions == "json" else "sample_dataset_text")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    lines = []
    for scene in SCENES:
        img, captions = render(scene, rng)
        if scene.file_name.endswith(".png"):
            img.save(out / scene.file_name, optimize=True)
        else:
            img.save(out / scene.file_name, quality=85)
        # compact JSON, as preflight normalises it
        text = json.dumps(captions["structured"], separators=(",", ":")) if args.captions == "json" else captions["text"]
        lines.append(json.dumps({"file_name": scene.file_name, "caption": text}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    kind = ("FIBO-style structured JSON captions" if args.captions == "json" else
            f"plain captions that continue the caption prefix \"{TEXT_CAPTION_PREFIX}\" (legacy versions)")
    (out / "README.md").write_text(
        "# Sample dataset\n\n"
        f"Six small synthetic images (a coloured circle, square or triangle on a gradient) with {kind}\n"
        "in `metadata.jsonl`, for smoke tests and examples.\n"
        f"Generated deterministically by `scripts/make_sample_dataset.py --captions {args.captions}`; rerun it "
        "instead of editing by hand.\n",
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
