"""The ``transfusion`` command line.

    transfusion train --preset tiny --steps 200 --device cpu --out runs/tiny [key=value ...] [--resume]
    transfusion train --model discrete --preset tiny --steps 200 --device cpu --out runs/tiny-discrete
    transfusion train --config run.toml --out runs/x
    torchrun --nproc_per_node 2 -m transfusion.cli train ...        (data parallel, same options)
    transfusion autoencoder train --kind vae --dataset shapes --out runs/vae [key=value ...]

Configuration, lowest to highest precedence: the model preset (``--preset``, else the file's ``preset``,
else ``tiny``), the TOML file (``--config``; tables ``[model]``, ``[train]``, ``[data]``, ``[ae]`` and a
top-level ``preset``), ``key=value`` arguments, then the flags ``--model`` / ``--steps`` / ``--device``.

``--model FAMILY`` is ``train.family=FAMILY``: ``transfusion`` (default) or ``discrete``, the Chameleon-style
baseline (VQ codes as extra vocabulary, one LM loss; see ``transfusion.train``). It changes nothing else in
the configuration; the run's config.json records the VQ's codebook size as ``model.codebook_size``.

Keys: ``model.NAME`` (a ``ModelConfig`` field), ``train.NAME`` (a ``TrainConfig`` field), ``data.NAME``
(an option of the dataset, e.g. ``data.image_size=64``), ``ae.NAME`` (a field of the quick autoencoder's
``AutoencoderConfig``). A bare ``NAME`` means ``train.NAME`` when TrainConfig has that field, else
``model.NAME`` (so ``lr=1e-3 dim=64`` works; ``attention`` is ``train.attention``). Values are parsed by
the field's type: numbers, ``true``/``false``, ``none`` for optional fields, comma lists for tuples
(``model.unet_channels=32,64``), ``{a = 1}`` TOML inline tables for dicts.

Every configuration error (unknown preset or key, a value of the wrong type, a negative learning rate, a
patch size that does not divide the latent size, ...) is reported before any work starts, on stderr,
naming the key, with exit status 2. A non-finite loss during training exits with status 1.

Subcommands are listed in ``COMMANDS``: ``train``, ``autoencoder train`` and ``generate`` (defined in
``transfusion.generation.command``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

EXIT_CONFIG = 2  # bad configuration (argparse uses 2 for usage errors too)
EXIT_FAILED = 1  # the run failed (e.g. non-finite loss)

SECTIONS = ("model", "train", "data", "ae")


class CliError(ValueError):
    """A configuration error found while parsing; the message names the key."""


# ====================================================================== value parsing
def _literal(text: str) -> Any:
    """A TOML literal (number, bool, string, array, inline table), else the text itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "none"
    if origin is tuple:
        return "a comma-separated list"
    if origin is dict or hint is dict:
        return "a TOML inline table like {key = 1}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def coerce(key: str, text: str, hint: Any) -> Any:
    """Parse the command-line string ``text`` for a field of type ``hint``; errors name ``key``."""
    origin = typing.get_origin(hint)
    t = text.strip()
    try:
        if origin in (typing.Union, types.UnionType):
            args = typing.get_args(hint)
            if type(None) in args and t.lower() in ("none", "null"):
                return None
            for h in args:
                if h is type(None):
                    continue
                try:
                    return coerce(key, text, h)
                except CliError:
                    continue
            raise ValueError
        if hint is bool:
            low = t.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(t)
        if hint is float:
            return float(t)
        if hint is str:
            return text
        if origin is tuple:
            args = typing.get_args(hint)
            items = [x for x in t.strip("()[]").split(",") if x.strip()]
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(key, x, args[0]) for x in items)
            if len(items) != len(args):
                raise ValueError
            return tuple(coerce(key, x, a) for x, a in zip(items, args))
        if origin is dict or hint is dict:
            value = _literal(t)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (ValueError, TypeError):
        raise CliError(f"{key} = {text!r}: expected {_describe(hint)}") from None
    return _literal(t)


def check_value(key: str, value: Any, hint: Any) -> Any:
    """Check a value that arrived typed (from TOML) against ``hint``; returns it (tuples for lists)."""
    from transfusion.train import _type_ok

    if not _type_ok(value, hint):
        raise CliError(f"{key} = {value!r}: expected {_describe(hint)}")
    if isinstance(value, list):
        return tuple(value)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# ====================================================================== resolving a train configuration
def _split_key(key: str, model_fields: dict[str, Any], train_fields: dict[str, Any]) -> tuple[str, str]:
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise CliError(f"{key}: unknown key prefix {section!r}; use one of {', '.join(SECTIONS)}")
    elif key in train_fields:
        section, name = "train", key
    elif key in model_fields:
        section, name = "model", key
    else:
        raise CliError(
            f"{key}: unknown key; model keys: {', '.join(sorted(model_fields))}; train keys: "
            f"{', '.join(sorted(train_fields))}; dataset options as data.NAME, autoencoder options as ae.NAME"
        )
    if section == "model" and name not in model_fields:
        raise CliError(f"model.{name}: unknown model key; valid: {', '.join(sorted(model_fields))}")
    if section == "train" and name not in train_fields:
        raise CliError(f"train.{name}: unknown train key; valid: {', '.join(sorted(train_fields))}")
    if not name:
        raise CliError(f"{key}: empty key name")
    return section, name


def resolve_train_args(
    preset: str | None,
    config_file: str | None,
    overrides: list[str],
    steps: int | None = None,
    device: str | None = None,
    family: str | None = None,
):
    """(ModelConfig, TrainConfig, preset name) from the CLI inputs; raises CliError / ConfigError.

    ``steps`` / ``device`` / ``family`` are the flags ``--steps`` / ``--device`` / ``--model``."""
    from transfusion.config import PRESETS, ModelConfig, get_preset
    from transfusion.train import TrainConfig

    model_fields, train_fields = _hints(ModelConfig), _hints(TrainConfig)
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    file_preset = None
    if config_file:
        path = Path(config_file)
        try:
            doc = tomllib.loads(path.read_text())
        except OSError as e:
            raise CliError(f"--config {config_file}: cannot read ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise CliError(f"--config {config_file}: invalid TOML ({e})") from None
        for key, value in doc.items():
            if key == "preset":
                if not isinstance(value, str):
                    raise CliError(f"preset = {value!r} in {config_file}: expected a string")
                file_preset = value
            elif key in SECTIONS and isinstance(value, dict):
                for name, v in value.items():
                    full = f"{key}.{name}"
                    _split_key(full, model_fields, train_fields)
                    if key == "model":
                        v = check_value(full, v, model_fields[name])
                    elif key == "train":
                        v = check_value(full, v, train_fields[name])
                    values[key][name] = v
            else:
                raise CliError(
                    f"{key}: unknown entry in {config_file}; expected 'preset' or tables {list(SECTIONS)}"
                )
    for arg in overrides:
        if "=" not in arg:
            raise CliError(f"{arg!r}: expected key=value (see --help)")
        key, text = arg.split("=", 1)
        section, name = _split_key(key.strip(), model_fields, train_fields)
        full = f"{section}.{name}"
        if section == "model":
            values["model"][name] = coerce(full, text, model_fields[name])
        elif section == "train":
            values["train"][name] = coerce(full, text, train_fields[name])
        else:
            values[section][name] = _literal(text.strip())
    if steps is not None:
        values["train"]["steps"] = steps
    if device is not None:
        values["train"]["device"] = device
    if family is not None:
        values["train"]["family"] = family

    name = preset or file_preset or "tiny"
    if name not in PRESETS:
        raise CliError(f"--preset {name!r}: unknown model preset; valid presets: {', '.join(PRESETS)}")
    try:
        model_cfg = get_preset(name, **values["model"])
    except (ValueError, TypeError) as e:
        raise CliError(str(e).replace("ModelConfig.", "model.")) from None
    train_values = dict(values["train"])
    train_values["dataset_options"] = {**train_values.get("dataset_options", {}), **values["data"]}
    train_values["autoencoder_options"] = {**train_values.get("autoencoder_options", {}), **values["ae"]}
    train_cfg = TrainConfig.from_dict(train_values)
    return model_cfg, train_cfg, name


# ====================================================================== subcommands
_LATENTS_AND_RESUME_HELP = """\
image latents (train.autoencoder):
  auto  train a quick VAE (autoencoder defaults sized to the model's latent shape, plus ae.*)
        into OUT/autoencoder and keep a copy in CACHE/autoencoders/<hash of its config and data>;
        later runs with the same settings copy it from there instead of training it again.
        CACHE = train.cache_dir, else $TRANSFUSION_CACHE, else ~/.cache/transfusion-bench
        (cache_dir=none: no cache). Encoded latents are cached in CACHE/latents.
  PATH  a saved autoencoder (transfusion autoencoder train); the model's latent shape follows it
  pool  no autoencoder: average-pooled pixels (tests, smoke runs; not for --model discrete)
With --model discrete the autoencoder is a VQ model (auto trains a quick one with ae.codebook_size
codes, default 1024; a PATH must be a VQ autoencoder: transfusion autoencoder train --kind vq) and the
images are its codes; model.codebook_size = 0 (the default) takes the codebook size from it.

--resume continues OUT from checkpoints/latest.json exactly (same data order, noise, RNG); only
steps, log_every, ckpt_every, keep_checkpoints, device, progress, compile and threads may change.
Data parallel: torchrun --nproc_per_node N -m transfusion.cli train ... (same options).
"""


def _train_epilog() -> str:
    from transfusion.config import PRESETS, ModelConfig
    from transfusion.train import TrainConfig

    lines = ["train keys (train.NAME=VALUE or NAME=VALUE):"]
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name} = {default!r}: {f.metadata.get('help', '')}")
    lines.append("")
    lines.append("model keys (model.NAME=VALUE, or NAME=VALUE when no train key has that name);")
    lines.append("defaults shown are ModelConfig's, presets override some:")
    names = [f"{f.name}={getattr(ModelConfig(), f.name)!r}" for f in fields(ModelConfig)]
    line = " "
    for item in names:
        if len(line) + len(item) > 100:
            lines.append(line)
            line = " "
        line += " " + item
    lines.append(line)
    lines.append("")
    lines.append(f"presets: {', '.join(PRESETS)}")
    lines.append("dataset options: data.NAME=VALUE (e.g. data.image_size=64, data.max_objects=1)")
    lines.append("quick-autoencoder options: ae.NAME=VALUE (AutoencoderConfig fields)")
    lines.append("")
    lines.append(_LATENTS_AND_RESUME_HELP)
    lines.append("model families (--model, same as train.family): transfusion (default) | discrete")
    lines.append("  discrete: the Chameleon-style baseline on VQ codes; every other key means the same.")
    lines.append("  Chameleon's stabilisers, QK-norm (model.qk_norm=true) and the z-loss")
    lines.append("  (model.z_loss=1e-5), are off by default for both families.")
    lines.append("image head: model.prediction_type=epsilon (the paper: predict the noise) | v_prediction")
    lines.append("  (predict v = sqrt(abar) eps - sqrt(1 - abar) x0; the sampler follows the run's choice).")
    lines.append("diffusion loss weight: model.diffusion_loss_weighting=none (the paper) | min_snr")
    lines.append("  (model.min_snr_gamma=5) | eps_equivalent (v's loss weighted to equal the eps loss).")
    lines.append("")
    lines.append("example: transfusion train --preset tiny --steps 200 --device cpu --out runs/tiny lr=2e-3")
    return "\n".join(lines)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (Transfusion or the discrete baseline; data parallel under torchrun)",
        description=(
            "Train a model and write OUT/config.json, OUT/metrics.jsonl and OUT/checkpoints/. "
            "Configuration: --preset < --config file < key=value < --model/--steps/--device."
        ),
        epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", help="model size preset (default: the config file's, else 'tiny')")
    p.add_argument(
        "--config", metavar="FILE.toml", help="TOML file: preset + [model] [train] [data] [ae] tables"
    )
    p.add_argument(
        "--model",
        metavar="FAMILY",
        help="model family: transfusion (default) | discrete (same as train.family=FAMILY)",
    )
    p.add_argument("--steps", type=int, metavar="N", help="optimizer steps (same as train.steps=N)")
    p.add_argument("--device", help="cpu | cuda | cuda:N | auto (same as train.device=...)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (config, metrics, checkpoints)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in DIR from its latest checkpoint (starts fresh when there is none)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="check the configuration, print it as JSON and exit"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides (see below)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from transfusion.train import ConfigError, NonFiniteLossError, check_config, train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        model_cfg, train_cfg, preset = resolve_train_args(
            args.preset, args.config, args.overrides, args.steps, args.device, args.model
        )
        model_cfg = check_config(model_cfg, train_cfg, world)
    except (CliError, ConfigError) as e:
        return _fail(str(e), EXIT_CONFIG)
    if args.dry_run:
        print(
            json.dumps(
                {"preset": preset, "model": model_cfg.to_dict(), "train": train_cfg.to_dict()}, indent=2
            )
        )
        return 0
    try:
        result = train(model_cfg, train_cfg, args.out, resume=args.resume, preset=preset)
    except ConfigError as e:
        return _fail(str(e), EXIT_CONFIG)
    except NonFiniteLossError as e:
        return _fail(str(e), EXIT_FAILED)
    if int(os.environ.get("RANK", "0")) == 0:
        row = result.last_metrics
        if row:
            losses = ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k.endswith("loss"))
            print(f"[train] done: step {row['step']}, {losses}, {row['wall_time']:.1f}s -> {args.out}")
    return 0


# ---------------------------------------------------------------------- autoencoder
def _add_autoencoder(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("autoencoder", help="image autoencoders (VAE for Transfusion, VQ for the baseline)")
    asub = p.add_subparsers(dest="ae_command", metavar="COMMAND", required=True)
    t = asub.add_parser(
        "train",
        help="train a VAE or VQ autoencoder on a dataset",
        description="Train an image autoencoder and save it to DIR (load with transfusion.autoencoders).",
        epilog=(
            "keys: ae.NAME=VALUE or NAME=VALUE for AutoencoderConfig fields; data.NAME=VALUE for dataset "
            "options (e.g. data.image_size=64)."
        ),
    )
    t.add_argument("--kind", choices=("vae", "vq"), default="vae", help="continuous VAE or VQ (default vae)")
    t.add_argument(
        "--dataset", default="shapes", help="dataset name: shapes | digits | folder (default shapes)"
    )
    t.add_argument("--examples", type=int, metavar="N", help="train on the first N items of the train split")
    t.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    t.add_argument("--out", required=True, metavar="DIR", help="where to save the autoencoder")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="AutoencoderConfig / dataset options")
    t.set_defaults(func=_cmd_autoencoder_train)


def _cmd_autoencoder_train(args: argparse.Namespace) -> int:
    import torch

    from transfusion.train import ConfigError, TrainConfig, build_dataset, resolve_threads

    try:
        from transfusion import autoencoders as aem
    except ImportError as e:
        return _fail(f"transfusion.autoencoders is not available ({e})", EXIT_FAILED)
    ae_fields = _hints(aem.AutoencoderConfig)
    values: dict[str, Any] = {}
    data: dict[str, Any] = {}
    try:
        if "kind" in ae_fields:
            values["kind"] = args.kind
        for arg in args.overrides:
            if "=" not in arg:
                raise CliError(f"{arg!r}: expected key=value")
            key, text = (x.strip() for x in arg.split("=", 1))
            if key.startswith("data."):
                data[key[5:]] = _literal(text)
                continue
            name = key[3:] if key.startswith("ae.") else key
            if name not in ae_fields:
                raise CliError(f"{key}: unknown autoencoder key; valid: {', '.join(sorted(ae_fields))}")
            values[name] = coerce(f"ae.{name}", text, ae_fields[name])
        if args.examples is not None and args.examples <= 0:
            raise CliError(f"--examples {args.examples}: must be positive")
        try:
            cfg = aem.AutoencoderConfig(**values)
        except (ValueError, TypeError) as e:
            raise CliError(f"ae: {e}") from None
        tc = TrainConfig(dataset=args.dataset, dataset_options=data, train_examples=args.examples or 0)
        dataset = build_dataset(tc)
        if args.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            try:
                device = torch.device(args.device)
            except RuntimeError as e:
                raise CliError(f"--device {args.device!r}: {e}") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise CliError(f"--device {args.device!r}: CUDA is not available")
    except (CliError, ConfigError) as e:
        return _fail(str(e), EXIT_CONFIG)
    if device.type == "cpu":
        torch.set_num_threads(resolve_threads())
    ae = aem.train_autoencoder(cfg, dataset, Path(args.out), device)
    shape = getattr(ae, "latent_shape", None)
    print(f"[autoencoder] saved to {args.out} (latent shape {tuple(shape) if shape is not None else '?'})")
    return 0


# ---------------------------------------------------------------------- generate
def _add_generate(sub: argparse._SubParsersAction) -> None:
    """``transfusion generate`` lives in ``transfusion.generation.command`` (argparse-only import)."""
    try:
        from transfusion.generation.command import add_generate_subparser
    except ImportError:  # not installed in this tree: the other commands still work
        return
    add_generate_subparser(sub)


# ====================================================================== entry point
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "train": _add_train,
    "autoencoder": _add_autoencoder,
    "generate": _add_generate,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transfusion",
        description="Transfusion bench: train Transfusion models (text NTP + image diffusion) and the "
        "discrete baseline, and sample from them; scoring is `python -m bench quick` and "
        "`python -m bench study`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS.values():
        add(sub)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"transfusion: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options: argparse leaves the later ones unparsed.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("transfusion: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
