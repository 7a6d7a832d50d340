"""fewshot_jax: few-shot learning (ProtoNet, MatchingNet, LGM-Net, IDeMe-Net) in JAX/Flax."""

__version__ = "0.1.0"
