"""fewshot_jax: few-shot learning in JAX/Flax; the methods are listed in fewshot_jax/methods/__init__.py."""

__version__ = "0.1.0"


def load(workdir: str, **kwargs):
  """The model of a trained workdir, to predict and embed from Python: fewshot_jax.api.load (imported
  here on first use, so `import fewshot_jax` stays light)."""
  from fewshot_jax import api  # pylint: disable=import-outside-toplevel
  return api.load(workdir, **kwargs)
