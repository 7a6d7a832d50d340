"""IDeMe-Net presets: `--config=configs/idemenet.py:<preset>`.

pretrain   stage 1 ("softRandom"): 64-way ResNet-18 on the base classes, batch
           128 from the first 500 images per class (an epoch = the list twice
           = 500 steps), RandomResizedCrop + flip + soft-random patch mixing
           (p = 2/3), Adam 1e-3 halved every 10 epochs, 35 epochs.
mini-5w1s  stage 2: deformation net D meta-trained on 5-way episodes (15
mini-5w5s  queries per class) from the base classes, augnum 5, chooseNum 30,
           gallery 30 per base class; Adam: D 1e-3, scale 1e-3, E 1e-4, fc 1e-3,
           halved every 40 epochs of 600 episodes; 120 epochs; BatchNorm frozen.
           First round (the published recipe): E fixed. Set
           method.pretrained to the stage-1 workdir. Round 2: method.pretrained =
           the round-1 workdir (its D, E, fc and scale are loaded),
           fix_deformation=True, fix_embedding=False.
           As the reference: images are the central 87.5% (Resize 256 +
           CenterCrop 224), the gallery image is flipped like the probe, the
           gallery is embedded with E's BatchNorm in training mode, the
           classification loss covers real and deformed supports, and the
           scale's learning rate is constant.

Images: ImageNet mean/std; data.input_size = 224 as the paper (upsampled on the
device from the 84x84 copy); pass --config.data.input_size=84 for fast runs.
"""

from fewshot_jax import config as base
from fewshot_jax.data import common, registry

PRESETS = ("pretrain", "mini-5w1s", "mini-5w5s", "tiered-pretrain", "tiered-5w1s", "tiered-5w5s",
           "cub-pretrain", "cub-5w1s", "cub-5w5s")
# tieredImageNet and CUB (84x84 copies, upsampled to 224 as miniImageNet): the same recipe with
# their base-class count (the record's); stage 1 uses the first 500 images of a class, every
# image of a CUB class.
_PRETRAIN_IMAGES = {"cub": 1000}


def get_config(preset: str = "mini-5w1s"):
  preset = base.check_preset(preset, PRESETS)
  c = base.base_config()
  prefix = preset.split("-")[0] if "-" in preset else "mini"
  dataset = registry.by_preset(prefix)
  num_classes, images_per_class = dataset.base_classes, _PRETRAIN_IMAGES.get(prefix, 500)
  base.apply_dataset(c, dataset.name)
  # The reference's ImageNet statistics, whatever the dataset.
  c.data.update(mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD, input_size=224)
  c.model.backbone = "resnet18"
  c.eval.update(queries=15, episodes=600, val_episodes=200, tasks=4)
  if preset.endswith("pretrain"):
    c.method.update(name="idemenet_pretrain", batch_size=128, images_per_class=images_per_class, mix_prob=2 / 3,
                    grid=3, flip_prob=0.5, crop_scale=(0.08, 1.0), num_classes=num_classes)
    c.episode.update(ways=5, shots=1, queries=15, tasks=1)  # validation episodes (prototype accuracy of E)
    c.train.update(optimizer="adam", lr=1e-3, schedule="step", decay_every=5000, decay_factor=0.5,
                   steps=17500, eval_every=500, log_every=100, steps_per_call=10)
    return c
  shots = 1 if preset.endswith("5w1s") else 5
  c.method.update(
      name="idemenet", grid=3, augnum=5, choose_num=30, gallery_per_class=30, gallery_seed=0,
      num_classes=num_classes, probe_flip=0.5,
      gallery_flip=0.5,  # the gallery image's own horizontal flip (0: never, our earlier behaviour)
      # Gallery features with E's BatchNorm in training mode over class-sorted chunks of 128
      # (the reference's acquireFeature), recalibrating E's running statistics; 'eval' keeps them.
      gallery_bn="train", gallery_bn_chunk=128,
      cls_images="all",  # classification loss over real + deformed supports ('deformed': copies only)
      decay_scale=False,  # the reference's scale optimiser has no scheduler
      pretrained="",  # workdir of the stage-1 run (or of --mode=convert)
      fix_embedding=True, fix_deformation=False,  # round 1 of the published recipe
      lr_deformation=1e-3, lr_scale=1e-3, lr_embedding=1e-4, lr_fc=1e-3,
      cls_start_step=600,  # the classification loss is skipped in the first epoch
      decay_every=24000, decay_factor=0.5,  # StepLR(40 epochs x 600 episodes, 0.5)
      eval_mode="deformed", scale_init=1.0)
  c.data.center_crop = 0.875  # stage-2 images: Resize 256 + CenterCrop 224 as the reference
  c.episode.update(ways=5, shots=shots, queries=15, tasks=1)
  c.train.update(steps=72000, eval_every=600, log_every=100, steps_per_call=10)
  return c
