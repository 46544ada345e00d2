"""Mamba and Mamba2 language models in JAX/Flax NNX."""

from mamba_jax import ops
from mamba_jax.cache import MixerCache
from mamba_jax.config import MambaConfig, UnsupportedModelError
from mamba_jax.generate import generate
from mamba_jax.loading import CheckpointError, from_pretrained, model_from_params, param_count
from mamba_jax.model import MambaLM

__all__ = [
  "MambaConfig",
  "MambaLM",
  "MixerCache",
  "CheckpointError",
  "UnsupportedModelError",
  "from_pretrained",
  "generate",
  "model_from_params",
  "param_count",
  "ops",
]
