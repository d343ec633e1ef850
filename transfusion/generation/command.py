"""``transfusion generate``: sample images from a caption, or caption an image, with a trained run.

    transfusion generate --checkpoint DIR --prompt "a small red circle at the top left" --n 16 --out grid.png
    transfusion generate --checkpoint DIR --image photo.png

Text-to-image writes a PNG grid of ``--n`` samples (row i seeded with ``--seed + i``), decoding the
latents with the run's autoencoder. ``--image`` encodes the image with that autoencoder and prints the
caption. Errors in the arguments or the run directory exit with status 2 and a message on stderr.

Both model families work: for a discrete (Chameleon-style) run the images are drawn as VQ codes at
``--code-temperature`` with ``--guidance`` as the classifier-free guidance scale of the code logits, and
decoded with the run's VQ autoencoder (``--scheduler`` / ``--steps`` do not apply); captioning encodes the
image to codes and samples the caption from the tokenizer's vocabulary.

This module imports only argparse at import time, so ``transfusion.cli`` can register it cheaply:
``COMMANDS["generate"] = add_generate_subparser``.
"""

from __future__ import annotations

import argparse
import sys
import time

EXIT_CONFIG = 2


def _guidance(text: str) -> float | None:
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'none'") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, metavar="DIR", help="run directory written by transfusion train"
    )
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="caption to draw (text-to-image)")
    what.add_argument("--image", metavar="FILE", help="image file to caption (image-to-text)")
    p.add_argument("--n", type=int, default=16, help="images to sample for --prompt (default 16)")
    p.add_argument("--out", default="grid.png", help="PNG grid to write for --prompt (default grid.png)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: about sqrt(n))")
    p.add_argument("--scheduler", choices=("ddpm", "ddim"), default="ddpm", help="sampler (default ddpm)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 250 ddpm, 50 ddim)")
    p.add_argument(
        "--guidance", type=_guidance, default=3.0, help="classifier-free guidance scale, or none (default 3)"
    )
    p.add_argument(
        "--clip-sample-range",
        type=float,
        default=None,
        metavar="R",
        help="clamp each denoising step's x_0 estimate to [-R, R] (default: no clamp, the paper's recipe); "
        "a loose R such as 10 stops small models' latents from growing with the step count",
    )
    p.add_argument("--batch-size", type=int, default=16, help="images per forward batch (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="caption length limit (default 64)")
    p.add_argument(
        "--min-new-tokens",
        type=int,
        default=None,
        help="caption tokens before <EOS> may end it (default 1, or --max-new-tokens if that is 0; as in "
        "the quick and study evaluations: a greedy caption can otherwise end at once, since caption "
        "dropout trains that form; 0 = no floor)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="caption sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="caption top-k sampling")
    p.add_argument(
        "--code-temperature",
        type=float,
        default=1.0,
        help="discrete runs: temperature of the image-code draws (default 1; 0 = greedy)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    p.add_argument("--attention", default="sdpa", help="attention backend for decoding (default sdpa)")


def _fail(message: str) -> int:
    print(f"transfusion: error: {message}", file=sys.stderr)
    return EXIT_CONFIG


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from transfusion.generation.api import caption, is_discrete, text_to_image
    from transfusion.generation.run import image_size_of, load_image, load_run, make_grid, save_png
    from transfusion.generation.sampling import SamplingConfig

    for name in ("n", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is None or value < (0 if name == "max_new_tokens" else 1):
            return _fail(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    if args.min_new_tokens is not None and args.min_new_tokens < 0:
        return _fail(f"--min-new-tokens {args.min_new_tokens}: must be 0 or more")
    min_new_tokens = min(1, args.max_new_tokens) if args.min_new_tokens is None else args.min_new_tokens
    try:
        run = load_run(args.checkpoint, step=args.step, device=args.device, attention=args.attention)
        if run.tokenizer is None:
            raise ValueError(f"{args.checkpoint}: no tokenizer.json")
        sampling = SamplingConfig(
            scheduler=args.scheduler,
            num_steps=args.steps,
            guidance_scale=args.guidance,
            clip_sample_range=args.clip_sample_range,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
        )
        discrete = is_discrete(run.model)
        if args.prompt is not None:
            if run.autoencoder is None:
                raise ValueError(f"{args.checkpoint}: the run has no autoencoder to decode its latents with")
            image_sampling = sampling
            if discrete:  # the codes are drawn at --code-temperature; --top-k is for captions
                image_sampling = sampling.with_options(temperature=args.code_temperature, top_k=None)
            t0 = time.time()
            images = []
            for start in range(0, args.n, args.batch_size):
                count = min(args.batch_size, args.n - start)
                gens = [torch.Generator().manual_seed(args.seed + start + i) for i in range(count)]
                images.append(
                    text_to_image(
                        run.model,
                        [args.prompt] * count,
                        tokenizer=run.tokenizer,
                        autoencoder=run.autoencoder,
                        generator=gens,
                        config=image_sampling,
                    )
                )
            grid = make_grid(torch.cat(images), nrow=args.nrow)
            out = save_png(grid, args.out)
            if discrete:
                h = run.model.cfg.latent_size
                how = f"{h}x{h} VQ codes each at temperature {args.code_temperature}"
            else:
                how = f"{args.scheduler} {sampling.steps} steps"
            print(f"wrote {out} ({args.n} images, {how}, guidance {args.guidance}, {time.time() - t0:.1f}s)")
            return 0
        if run.autoencoder is None:
            raise ValueError(f"{args.checkpoint}: the run has no autoencoder to encode the image with")
        image = load_image(args.image, image_size_of(run.autoencoder))
        text = caption(
            run.model,
            image,
            autoencoder=run.autoencoder,
            tokenizer=run.tokenizer,
            generator=args.seed,
            config=sampling.with_options(min_new_tokens=min_new_tokens),
        )[0]
        print(text)
        return 0
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))


def add_generate_subparser(sub: argparse._SubParsersAction) -> None:
    """Register ``generate`` on ``transfusion``'s subparsers (``func(args) -> exit status``)."""
    p = sub.add_parser(
        "generate",
        help="sample images from a caption or caption an image with a trained run",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_arguments(p)
    p.set_defaults(func=run_generate)


def generate_main(argv: list[str] | None = None) -> int:
    """``transfusion generate ARGS``: parse ``argv`` (without the word ``generate``) and run."""
    parser = argparse.ArgumentParser(prog="transfusion generate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_generate(args)


__all__ = ["add_arguments", "add_generate_subparser", "generate_main", "run_generate"]
