"""Finish a run however far it got: reuse a finished run folder, resume an interrupted one, or start it.

The demo and ``advpipe study`` both rerun the same command to continue their work, so both need
"do what is left of this run" rather than "train from scratch".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from advpipe.errors import AdvpipeError
from advpipe.models.checkpoint import load_checkpoint
from advpipe.train.config import TrainConfig

log = logging.getLogger(__name__)

#: config fields that do not change what a run computes (test_subset: only which test images each
#: epoch's monitoring figure uses; the last epoch is always evaluated on the full test set)
_NOT_THE_RUN = {"resume", "overwrite", "device", "workers", "data_dir", "out", "test_subset"}


@dataclass(frozen=True)
class RunState:
    """How far the run in a folder got: finished epochs (0 when nothing is saved) and whether its config matches."""

    epochs_done: int
    same_config: bool
    differences: tuple[str, ...] = ()


def run_state(cfg: TrainConfig) -> RunState:
    """Read ``last.pt`` of the run folder, if any, and compare its config with ``cfg``."""
    last = cfg.run_dir() / "last.pt"
    if not last.is_file():
        return RunState(0, True)
    done = load_checkpoint(last)
    # a field the saved config lacks was added later: the run was computed with that field's default
    defaults = TrainConfig().to_dict()
    old = {k: v for k, v in {**defaults, **done.config}.items() if k not in _NOT_THE_RUN}
    new = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_THE_RUN}
    diff = tuple(sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)))
    return RunState(done.epoch, not diff, diff)


def finish_run(cfg: TrainConfig, *, on_change: str = "refuse") -> Path:
    """Train what is left of ``cfg``'s run and return its folder.

    A finished run with the same config is reused, an interrupted one resumed from ``last.pt``. A
    folder holding a run of another config is refused (``on_change="refuse"``) or started over
    (``"overwrite"``).
    """
    from advpipe.train.loop import train

    state = run_state(cfg)
    if not state.same_config:
        if on_change != "overwrite":
            raise AdvpipeError(f"{cfg.run_dir()} holds a run with other settings ({', '.join(state.differences)}); "
                               "move it away or choose another output folder")
        return train(replace(cfg, resume=False, overwrite=True)).run_dir
    if state.epochs_done >= cfg.epochs:
        log.info("reusing the finished run in %s", cfg.run_dir())
        return cfg.run_dir()
    if state.epochs_done > 0:
        return train(replace(cfg, resume=True, overwrite=False)).run_dir
    return train(replace(cfg, resume=False, overwrite=False)).run_dir
