"""A drastically reduced quick-profile configuration (seconds on CPU) shared by the quick and study tests."""

TINY_QUICK = {
    "model_overrides": {"max_seq_len": 256, "dim": 32, "n_heads": 2, "n_layers": 1},
    "steps": 4,
    "batch_rows": 2,
    "train_examples": 48,
    "log_every": 2,
    "n_t2i": 3,
    "n_caption": 3,
    "n_text": 6,
    "num_diffusion_steps": 3,
    "caption_max_tokens": 6,
    "fid_cnn": {"train_steps": 10, "train_images": 128, "batch_size": 32},
    "autoencoder_options": {
        "steps": 2,
        "batch_size": 4,
        "train_images": 16,
        "val_images": 4,
        "scale_images": 8,
    },
}
