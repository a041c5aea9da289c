"""The `generate` command: images from a base model and a trained LoRA, through the same
`generate()` as validation renders and the service."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FieldError, InvalidGenerationParameterError, InvalidParameterError, LoraFileError, PromptError


def add_commands(commands: argparse._SubParsersAction) -> None:
    gen = commands.add_parser("generate", help="render images from a base model and a trained LoRA")
    gen.add_argument("--base", required=True, help="diffusers-format base directory or hub id; its model_index.json "
                     "names the family")
    gen.add_argument("--lora", help="a checkpoint folder, its pytorch_lora_weights.safetensors, or a run folder (its "
                     "newest checkpoint); without it the base renders alone")
    gen.add_argument("--checkpoint-step", type=int, help="with a run folder as --lora: the checkpoint to use")
    gen.add_argument("--prompt", action="append", default=[], help="repeatable; for FIBO a structured JSON prompt as "
                     "one string, e.g. '{\"short_description\": \"...\"}'")
    gen.add_argument("--prompt-file", help="one prompt per line (blank lines are skipped)")
    gen.add_argument("--seed", type=int, default=0, help="image i of each prompt uses seed + i")
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the family's, FIBO 50, 3.2 30, 2.3 50)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the family's, 5)")
    gen.add_argument("--aspect-ratio", default="1:1", help="width:height from Bria's list (1:1, 2:3, 3:2, 3:4, 4:3, "
                     "4:5, 5:4, 9:16, 16:9)")
    gen.add_argument("--resolution", type=int, help="side of the square of equal area (default: the run's training "
                     "resolution when --lora comes from a run folder, else 1024)")
    gen.add_argument("--influence", type=float, default=1.0, help="LoRA scale, 0..1.5 (0: the base alone)")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--out", required=True, help="folder for 00.png, 01.png, ..., grid.png and prompts.json")
    prefix = gen.add_mutually_exclusive_group()
    prefix.add_argument("--generation-prefix", help="legacy families: text put before every prompt (default: the "
                        "caption_prefix of the run --lora comes from)")
    prefix.add_argument("--no-generation-prefix", action="store_true", help="use the prompts exactly as given")
    gen.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    gen.add_argument("--vlm", help="FIBO: a captioning model (hub id or folder, e.g. briaai/FIBO-vlm) that expands a "
                     "plain-text prompt into a structured JSON one first; the JSON used is in prompts.json")


def _as_flags(exc: InvalidParameterError) -> InvalidGenerationParameterError:
    """Settings name their fields (num_images); on the command line the flags are named (--num-images)."""
    return InvalidGenerationParameterError([FieldError(e.msg, "--" + e.field_name.replace("_", "-"), e.field_input)
                                            for e in exc.errors])


def _prompts(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(where it came from, text) for every prompt, --prompt first, then --prompt-file's lines."""
    prompts = [("--prompt", text) for text in args.prompt]
    if args.prompt_file:
        try:
            lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidGenerationParameterError.single("--prompt-file", args.prompt_file, f"cannot be read: {exc}")
        found = [(f"--prompt-file {args.prompt_file} line {n}", line)
                 for n, line in enumerate(lines, 1) if line.strip()]
        if not found:
            raise InvalidGenerationParameterError.single("--prompt-file", args.prompt_file,
                                                         "holds no prompt; write one prompt per line")
        prompts += found
    if not prompts:
        raise InvalidGenerationParameterError.single("--prompt", "",
                                                     "give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def _prompt_expander(args: argparse.Namespace, family):
    """(where, text) -> text, expanding a plain-text FIBO prompt with --vlm (loaded at the first one
    that needs it); without --vlm, or for a legacy family, prompts pass through unchanged."""
    if not args.vlm or family.caption_format != "json":
        return lambda where, text: text
    captioner = None

    def expand(where: str, text: str) -> str:
        nonlocal captioner
        from ..captioning import Captioner, fibo_prompt

        if text.strip().startswith("{"):
            return text
        if captioner is None:
            captioner = Captioner.load(args.vlm, device=args.device)
        structured, _ = fibo_prompt(text, captioner, seed=args.seed)
        print(f"{where}: expanded by {args.vlm} into {structured}")
        return structured

    return expand


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from diffusers.utils import logging as diffusers_logging

    from ..families import family_for_base
    from ..families.base import lora_file_keys
    from . import GenerationSettings, LoraPipeline, find_lora, write_samples

    family = family_for_base(args.base)
    if args.checkpoint_step is not None and not args.lora:
        raise LoraFileError(f"--checkpoint-step {args.checkpoint_step} needs --lora RUN_FOLDER")
    source = find_lora(args.lora, args.checkpoint_step) if args.lora else None
    if source and source.family_name not in (None, family.name):
        raise LoraFileError(f"--lora {source.file} was trained on a {source.family_name} base, but --base "
                            f"{args.base} is a {family.name} base; pass the base it was trained on")
    if args.no_generation_prefix:
        prefix = None
    elif args.generation_prefix is not None:
        prefix = args.generation_prefix
    else:  # training's caption_prefix, which FIBO runs never have
        prefix = source.caption_prefix if source and family.caption_format == "text" else None
    prompts = []
    expand = _prompt_expander(args, family)
    for where, text in _prompts(args):
        try:
            prompts.append(family.prepare_prompt(expand(where, text), prefix))
        except PromptError as exc:
            raise PromptError(f"{where}: {exc.message}") from None
        except InvalidParameterError as exc:
            if exc.errors[0].field_name == "prompt":
                raise InvalidGenerationParameterError.single(where, text, exc.errors[0].msg) from None
            raise _as_flags(exc) from None
    try:
        settings = GenerationSettings(
            seed=args.seed, num_images=args.num_images, steps=args.steps, guidance=args.guidance,
            aspect_ratio=args.aspect_ratio, influence=args.influence, negative_prompt=args.negative_prompt,
            resolution=args.resolution or (source.training_resolution if source else None))
    except InvalidParameterError as exc:
        raise _as_flags(exc) from None
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise InvalidGenerationParameterError.single("--device", args.device, str(exc)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidGenerationParameterError.single("--device", args.device, "this machine has no CUDA device")

    if source:
        try:
            lora_file_keys(source.file)  # a broken file is refused before a base is loaded for minutes
        except LoraFileError as exc:
            raise LoraFileError(f"--lora: {exc.message}") from None
        if source.note:
            print(source.note)
    diffusers_logging.disable_progress_bar()
    runner = LoraPipeline(family, args.base, device=device,
                          dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, max_loaded=1)
    try:
        runner.use(source.file if source else None, settings.influence)
    except LoraFileError as exc:
        raise LoraFileError(f"--lora: {exc.message}") from None
    images = runner.generate(source.file if source else None, prompts, settings)
    for path in write_samples(Path(args.out), images):
        print(path)
    return 0


COMMANDS = {"generate": _cmd_generate}
