"""The captioning commands of the CLI: `caption`, `visual-schema`, `expand-prompt`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CaptionInputError
from .prompts import DEFAULT_VLM

EXIT_FAILURE = 1


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def add_commands(commands: argparse._SubParsersAction) -> None:
    caption = commands.add_parser("caption", help="caption every image of a dataset that has no caption yet")
    caption.add_argument("dataset", help="dataset folder (images, and metadata.jsonl if there is one)")
    caption.add_argument("--training-version", required=True,
                         help="fibo: structured JSON captions; max, light, 3.2, 2.3: plain-text captions")
    caption.add_argument("--caption-prefix", help="legacy datasets: each caption continues this prefix")
    caption.add_argument("--visual-schema", help="FIBO: fix the values this visual schema holds in every caption "
                         "(default: DATASET/visual_schema.json when it exists)")
    caption.add_argument("--overwrite", action="store_true", help="recaption images that already have a caption")
    caption.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_vlm_options(caption)

    schema = commands.add_parser("visual-schema", help="the caption fields 5 to 10 images share (FIBO's format)")
    schema.add_argument("images", nargs="+", help="5 to 10 image files, or one folder holding them")
    schema.add_argument("--out", help="where to write it (default: visual_schema.json in the images' folder)")
    _add_vlm_options(schema)

    expand = commands.add_parser("expand-prompt", help="a FIBO JSON prompt from a short text prompt, or refined")
    expand.add_argument("prompt", help="text to expand; with --refine, a JSON prompt (or text, expanded first)")
    expand.add_argument("--schema", help="visual schema whose values the JSON prompt keeps")
    expand.add_argument("--refine", metavar="INSTRUCTION", help="apply this edit to the JSON prompt")
    _add_vlm_options(expand)


def _add_vlm_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vlm", default=DEFAULT_VLM, help=f"hub id or local folder of the Qwen3-VL (default "
                        f"{DEFAULT_VLM}); `make-tiny-base --family fibo-vlm DIR` builds a tiny one")
    parser.add_argument("--batch-size", type=_positive, default=8, help="images per generate call")
    parser.add_argument("--max-new-tokens", type=_positive, help="token budget of one caption (default: the caption "
                        "grammar's bound, with which every caption closes)")
    parser.add_argument("--string-tokens", type=_positive,
                        help="one token allowance for every string value (default: one per field, docs/CAPTIONS.md)")
    parser.add_argument("--max-pixels", type=_positive,
                        help="largest image area given to the VLM (default FIBO's 1024*28*28)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")


def _captioner(args: argparse.Namespace):
    from .captioner import load_captioner

    return load_captioner(args.vlm, string_tokens=args.string_tokens, max_pixels=args.max_pixels, device=args.device,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)


def cmd_caption(args: argparse.Namespace) -> int:
    from ..contract import is_fibo
    from .dataset import caption_dataset
    from .grammar import CaptionLimits, caption_grammar
    from .visual_schema import VISUAL_SCHEMA_FILE, load_visual_schema

    # the contract's rule, as the service applies it to uploaded captions: FIBO's are JSON, the rest text
    caption_format = "json" if is_fibo(args.training_version) else "text"
    schema = None
    schema_file = args.visual_schema or (Path(args.dataset) / VISUAL_SCHEMA_FILE)
    if caption_format == "json" and (args.visual_schema or Path(schema_file).is_file()):
        schema = load_visual_schema(schema_file)
        caption_grammar(CaptionLimits(), schema)  # refuses fields FIBO does not have, before loading a model
        print(f"visual schema: {schema_file}", file=sys.stderr)
    elif args.visual_schema:
        raise CaptionInputError("--visual-schema is for FIBO (JSON) captions, not legacy text captions")
    if args.caption_prefix and caption_format == "json":
        raise CaptionInputError("--caption-prefix is for legacy (text) captions; FIBO captions are JSON")
    summary = caption_dataset(args.dataset, lambda: _captioner(args), caption_format=caption_format,
                              overwrite=args.overwrite, caption_prefix=args.caption_prefix, visual_schema=schema,
                              seed=args.seed)
    print(json.dumps(summary.to_dict(), indent=1) if args.json else summary.format())
    return EXIT_FAILURE if summary.failed else 0


def cmd_visual_schema(args: argparse.Namespace) -> int:
    from .visual_schema import VISUAL_SCHEMA_FILE, check_image_count, save_visual_schema

    images = _image_paths(args.images)
    check_image_count(len(images))  # before loading a model
    out = Path(args.out) if args.out else images[0].parent / VISUAL_SCHEMA_FILE
    schema = _captioner(args).visual_schema(images, seed=args.seed)
    save_visual_schema(schema, out)
    print(json.dumps(schema, indent=2, ensure_ascii=False))
    if not schema:
        print("the images share no caption value: the schema is empty", file=sys.stderr)
    print(f"visual schema written to {out}", file=sys.stderr)
    return 0


def cmd_expand_prompt(args: argparse.Namespace) -> int:
    from .captioner import fibo_prompt
    from .visual_schema import load_visual_schema

    schema = load_visual_schema(args.schema) if args.schema else None
    captioner = _captioner(args)
    prompt, _ = fibo_prompt(args.prompt, captioner, schema=schema, seed=args.seed)
    if args.refine:
        prompt = captioner.refine(prompt, args.refine, seed=args.seed)
    print(prompt)
    return 0


def _image_paths(arguments: list[str]) -> list[Path]:
    """Image files as given, or the images of one folder."""
    from ..data.images import has_image_extension

    paths = [Path(a) for a in arguments]
    if len(paths) == 1 and paths[0].is_dir():
        paths = sorted(p for p in paths[0].iterdir() if p.is_file() and has_image_extension(p.name))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CaptionInputError(f"no such image file(s): {', '.join(missing)}")
    return paths


COMMANDS = {"caption": cmd_caption, "visual-schema": cmd_visual_schema, "expand-prompt": cmd_expand_prompt}
