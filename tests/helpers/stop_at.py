"""Run the advpipe CLI, stopping itself (SIGSTOP) at a moment of an ``--overwrite`` that lasts milliseconds.

``python tests/helpers/stop_at.py MOMENT ARGS...`` runs ``advpipe ARGS`` the way ``python -m
advpipe`` does, and stops the process right after MOMENT: ``staging`` (the staging folder made) or
a glob such as ``*/.run.new-*/best.pt`` (a checkpoint saved at a matching path). A test waits for the
stopped process and kills it there, so the kill lands at that moment on any machine, fast or slow.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys

import advpipe.train.loop as loop
from advpipe.cli import main

moment = sys.argv[1]
real_save, real_open = loop.save_checkpoint, loop.open_run_folder


def _stop() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def save_then_stop(path, ckpt) -> None:
    """Save as the loop does; stop this process when ``path`` matches the pattern."""
    real_save(path, ckpt)
    if fnmatch.fnmatch(str(path), moment):
        _stop()


def open_then_stop(run_dir, *, overwrite):
    """Open the run folder as the loop does; stop once a staging folder exists."""
    folder = real_open(run_dir, overwrite=overwrite)
    if folder.staging is not None:
        _stop()
    return folder


if moment == "staging":
    loop.open_run_folder = open_then_stop
else:
    loop.save_checkpoint = save_then_stop
sys.argv = ["advpipe", *sys.argv[2:]]
main()
