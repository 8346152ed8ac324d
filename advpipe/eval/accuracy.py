"""Clean accuracy (top-1 overall and per class) and the precision context, as evaluation uses them.

Both live lower down so that every layer can use them: :func:`evaluate_accuracy` in
:mod:`advpipe.models.accuracy`, :func:`autocast_context` in :mod:`advpipe.precision`. This module
keeps the names where training, evaluation, the tests and the benchmarks import them from.
"""

from advpipe.models.accuracy import evaluate_accuracy
from advpipe.precision import autocast_context

__all__ = ["autocast_context", "evaluate_accuracy"]
