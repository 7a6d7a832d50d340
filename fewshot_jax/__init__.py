"""fewshot_jax: few-shot learning in JAX/Flax; the methods are listed in fewshot_jax/methods/__init__.py."""

__version__ = "0.1.0"
