"""Run the advpipe CLI, stopping itself (SIGSTOP) right after it saves a checkpoint whose path matches a pattern.

``python tests/helpers/stop_after_save.py PATTERN ARGS...`` runs ``advpipe ARGS`` the way ``python -m
advpipe`` does. A test waits for the stopped process and kills it there, so a kill lands at a moment
that lasts only milliseconds in a real run (between two checkpoint saves) on any machine, fast or slow.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys

import advpipe.train.loop as loop
from advpipe.cli import main

pattern = sys.argv[1]
real_save = loop.save_checkpoint


def save_then_stop(path, ckpt) -> None:
    """Save as the loop does; stop this process when ``path`` matches the pattern."""
    real_save(path, ckpt)
    if fnmatch.fnmatch(str(path), pattern):
        os.kill(os.getpid(), signal.SIGSTOP)


loop.save_checkpoint = save_then_stop
sys.argv = ["advpipe", *sys.argv[2:]]
main()
