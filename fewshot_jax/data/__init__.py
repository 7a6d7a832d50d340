"""Data: TFDS builders, device-resident datasets, on-device episode sampling and augmentation."""
