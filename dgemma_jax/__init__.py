"""dgemma-jax: DiffusionGemma (block-autoregressive text diffusion, MoE) in JAX."""

from dgemma_jax.api import Model, from_config, from_pretrained
from dgemma_jax.cache import KVCache
from dgemma_jax.checkpoint import CheckpointError
from dgemma_jax.config import ConfigError, ModelConfig
from dgemma_jax.generation import DenoisingStep, GenerationResult, generate, infill
from dgemma_jax.model import DiffusionGemma

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DenoisingStep",
    "DiffusionGemma",
    "GenerationResult",
    "KVCache",
    "Model",
    "ModelConfig",
    "from_config",
    "from_pretrained",
    "generate",
    "infill",
]
__version__ = "0.1.0"
