"""Parse ``--aug``: one input-level augmentation and/or one training-objective method, joined by ``+``.

``cutout`` means cutout + standard cross-entropy; ``advprop`` means no input augmentation + the
AdvProp objective; ``cutout+advprop`` applies cutout to the batch first, then hands the augmented
batch to AdvProp (which attacks it and trains on both). See docs/training.md.
"""

from __future__ import annotations

from advpipe.augment import base as augment_base
from advpipe.errors import AdvpipeError
from advpipe.train.methods import METHODS


def parse_aug(spec: str) -> tuple[str, str]:
    """Split an ``--aug`` value into (input augmentation, training method), refusing bad combinations."""
    import advpipe.augment  # noqa: F401  (registers the augmentations)
    import advpipe.train  # noqa: F401  (registers the methods)

    augments, methods = augment_base.AUGMENTS, METHODS
    parts = [p.strip() for p in spec.split("+")]
    public_methods = [m for m in methods.names() if m != "standard"]
    choices = f"augmentations: {', '.join(augments.names())}; methods: {', '.join(public_methods)}"
    if len(parts) == 1:
        name = parts[0]
        if name in augments:
            return name, "standard"
        if name in methods and name != "standard":
            return "none", name
        raise AdvpipeError(f"unknown aug {spec!r}; {choices}", fields=("aug",))
    if len(parts) != 2 or not all(parts):
        raise AdvpipeError(f"aug {spec!r} must be one name or AUGMENTATION+METHOD; {choices}", fields=("aug",))
    first, second = parts
    if first in methods and second in augments:
        raise AdvpipeError(f"aug {spec!r}: put the input augmentation first ({second}+{first})", fields=("aug",))
    if first not in augments or first == "none":
        raise AdvpipeError(f"aug {spec!r}: {first!r} is not an input augmentation; {choices}", fields=("aug",))
    if second not in methods or second == "standard":
        raise AdvpipeError(f"aug {spec!r}: {second!r} is not a training method; {choices}", fields=("aug",))
    return first, second
