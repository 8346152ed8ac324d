"""``advpipe info``."""

from __future__ import annotations

from advpipe import __version__
from advpipe.cli import app
from advpipe.commands.errors_cli import user_errors
from advpipe.commands.reporting import echo

@app.command()
@user_errors
def info() -> None:
    """List the datasets, models, augmentations, training methods and built-in checkpoints."""
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
    from advpipe.models.checkpoint import BUILTIN_PREFIX, builtin_checkpoints, load_checkpoint

    for name in builtin_checkpoints():
        ck = load_checkpoint(BUILTIN_PREFIX + name)
        meta = ck.info
        acc = meta.get("test_acc")
        echo(f"checkpoint:    {BUILTIN_PREFIX}{name}: {ck.arch} on {ck.dataset} "
             f"({ck.fingerprint[:19]}...), epoch {ck.epoch}"
             + (f", test accuracy {100 * acc:.2f}%" if isinstance(acc, float) else "")
             + (f", commit {str(meta.get('commit'))[:10]}" if meta.get("commit") else ""))
        if meta.get("recipe"):
            echo(f"               recipe: {meta['recipe']}")


