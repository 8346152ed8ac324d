"""Training: the loop, the training-objective methods (registered on import) and configs."""

from advpipe.train import methods  # noqa: F401
from advpipe.train import advprop, afan, m2at, mtlat, pgd_at  # noqa: F401  (register the online methods)
