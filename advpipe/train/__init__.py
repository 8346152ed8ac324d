"""Training: the loop, the training-objective methods (registered on import) and configs."""

from advpipe.train import methods  # noqa: F401
