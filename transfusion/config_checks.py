"""``check_config``: every cheap check of a run's configuration, before any work (the CLI runs it before
launching; the loop runs it again). Each failure is a ``ConfigError`` naming the key to change."""

from __future__ import annotations

from pathlib import Path

from transfusion.config import ModelConfig
from transfusion.devices import resolve_attention, resolve_device
from transfusion.families import get_family
from transfusion.run_data import build_dataset, dataset_image_size, quick_autoencoder_config
from transfusion.train_config import ConfigError, TrainConfig


def check_config(model_cfg: ModelConfig, train_cfg: TrainConfig, world_size: int = 1) -> ModelConfig:
    """Every cheap check of a run's configuration; raises ConfigError naming the key. Returns the model
    config with the attention backend resolved for the device."""
    family = get_family(train_cfg.family)
    device = resolve_device(train_cfg)
    model_cfg = resolve_attention(train_cfg, model_cfg, device)
    if train_cfg.parallel == "none" and world_size > 1:
        raise ConfigError(
            f"train.parallel = 'none' trains one process, but {world_size} were launched; use 'ddp', "
            "'fsdp' or 'auto' under torchrun"
        )
    if train_cfg.batch_rows % world_size:
        raise ConfigError(
            f"train.batch_rows = {train_cfg.batch_rows} is not divisible by the number of data-parallel "
            f"ranks ({world_size})"
        )
    family.check(model_cfg, train_cfg)
    ds = build_dataset(train_cfg)
    H, W = dataset_image_size(ds)
    spec = train_cfg.autoencoder
    if spec in ("auto", "pool"):
        s = model_cfg.latent_size
        if H != W or H % s:
            raise ConfigError(
                f"model.latent_size = {s} does not divide the dataset's image size {H}x{W} "
                f"(train.autoencoder = {spec!r} maps images to latent_size x latent_size)"
            )
        if spec == "auto" and (H // s) & (H // s - 1):
            raise ConfigError(
                f"model.latent_size = {s}: image size {H} / latent size must be a power of two for the VAE"
            )
        if spec == "auto":
            try:
                import transfusion.autoencoders  # noqa: F401
            except ImportError as e:
                raise ConfigError(
                    f"train.autoencoder = 'auto' needs transfusion.autoencoders ({e}); use autoencoder=pool "
                    "or a PATH"
                ) from e
            quick_autoencoder_config(
                model_cfg, H, train_cfg.autoencoder_options, kind=family.autoencoder_kind
            )
    elif not Path(spec).exists():
        raise ConfigError(f"train.autoencoder = {spec!r}: no such file or directory (or use 'auto' / 'pool')")
    tok = train_cfg.tokenizer
    if tok == "byte":
        from transfusion.data import ByteTokenizer

        if ByteTokenizer().vocab_size > model_cfg.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {model_cfg.vocab_size} is smaller than the byte tokenizer's "
                f"{ByteTokenizer().vocab_size}"
            )
    elif tok == "bpe":
        try:
            import tokenizers  # noqa: F401
        except ImportError as e:
            raise ConfigError("train.tokenizer = 'bpe' needs the 'tokenizers' package") from e
    elif not Path(tok).is_file():
        raise ConfigError(f"train.tokenizer = {tok!r}: not 'byte', 'bpe' or an existing tokenizer file")
    return model_cfg
