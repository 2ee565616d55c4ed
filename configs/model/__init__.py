"""Model configs: ``get_config()`` returns a ConfigDict of ``dgemma_jax.config.ModelConfig`` fields."""
