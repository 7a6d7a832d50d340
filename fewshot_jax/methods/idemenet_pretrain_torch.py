"""IDeMe-Net stage 1's PyTorch bridge: the ClassificationNetwork (softRandom.t7), in idemenet_torch.py."""

from fewshot_jax.methods.idemenet_torch import pretrain_bridge as bridge  # pylint: disable=unused-import
