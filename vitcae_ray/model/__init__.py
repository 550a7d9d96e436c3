"""The ViTCAE model: attention with per-head temperatures, latents, prior, FiLM decoder."""

from .attention import Attention
from .vitcae import Block, ViTCAE, ViTCAEOutput, build_model, reparameterize

__all__ = ["Attention", "Block", "ViTCAE", "ViTCAEOutput", "build_model", "reparameterize"]
