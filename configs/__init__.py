"""ml_collections configs. ``configs/model/*.py`` each define ``get_config()`` -> ConfigDict of
``dgemma_jax.config.ModelConfig`` fields; load them with ``dgemma_jax.configs_io.load_model_config``."""
