"""Image autoencoders for the two model families: a VAE (continuous latents, Transfusion) and a VQ model
(discrete codes, the Chameleon-style baseline), both small diffusers models trained in-repo.

* ``AutoencoderConfig``: architecture + training recipe (``config.py``).
* ``build_autoencoder`` / ``TrainedAutoencoder`` / ``save_autoencoder`` / ``load_autoencoder`` / ``psnr``
  (``model.py``).
* ``train_autoencoder`` (``train.py``).
* ``cached_latents``: a dataset's latents or codes, encoded once into a checked safetensors file
  (``cache.py``).
"""

from transfusion.autoencoders.cache import cache_key, cache_path, cached_latents, dataset_identity
from transfusion.autoencoders.config import KINDS, RECON_LOSSES, AutoencoderConfig, default_block_out_channels
from transfusion.autoencoders.model import (
    META_NAME,
    WEIGHTS_NAME,
    TrainedAutoencoder,
    build_autoencoder,
    diffusers_kwargs,
    load_autoencoder,
    psnr,
    read_metadata,
    save_autoencoder,
    weights_sha256,
)
from transfusion.autoencoders.train import load_images, train_autoencoder

__all__ = [
    "KINDS", "META_NAME", "RECON_LOSSES", "WEIGHTS_NAME",
    "AutoencoderConfig", "TrainedAutoencoder",
    "build_autoencoder", "cache_key", "cache_path", "cached_latents", "dataset_identity",
    "default_block_out_channels", "diffusers_kwargs", "load_autoencoder", "load_images", "psnr",
    "read_metadata", "save_autoencoder", "train_autoencoder", "weights_sha256",
]  # fmt: skip
