"""``advpipe info``."""

from __future__ import annotations

from advpipe import __version__
from advpipe.cli import app
from advpipe.cli_util import echo, user_errors

@app.command()
@user_errors
def info() -> None:
    """List the datasets, models, augmentations and training methods."""
    import advpipe.augment  # noqa: F401
    import advpipe.train  # noqa: F401  (registers the methods)
    from advpipe.augment.base import AUGMENTS
    from advpipe.data.datasets import DATASETS
    from advpipe.models.registry import list_models
    from advpipe.train.methods import METHODS

    echo(f"advpipe {__version__}")
    echo("datasets:      " + ", ".join(DATASETS.names()))
    echo("models:        " + ", ".join(list_models()) + " (plus any torchvision classification model)")
    echo("augmentations: " + ", ".join(AUGMENTS.names()))
    echo("methods:       " + ", ".join(m for m in METHODS.names() if m != "standard"))


