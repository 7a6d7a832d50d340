"""PyTorch versions of the models, for parity tests and speed comparison; needs the
optional torch extra (pip install 'fewshot_jax[torch]')."""
