"""Tiny random SD and DINOv2 checkpoints, built from configs with fixed seeds.

They are saved with ``save_pretrained`` into a directory in the real layouts (diffusers:
unet/vae/text_encoder/tokenizer/scheduler; transformers: config + safetensors) and loaded
back through the same code a user's Hub id goes through. Used by tests and by
``python -m fiftyone_sdcorr bench --tiny`` / ``demo --tiny``.
"""

from fiftyone_sdcorr.tiny import build_tiny_dino, build_tiny_sd  # noqa: F401
