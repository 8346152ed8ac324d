"""advpipe: adversarial attacks as data augmentation, from precomputed AdvMask stores to online methods."""

__version__ = "0.1.0"
