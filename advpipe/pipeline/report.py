"""Mask-store summaries for people: advmask.txt Table III rows, partial summaries, and the store's data."""

from __future__ import annotations

from typing import Any

import numpy as np

from advpipe.data.datasets import DatasetSplit, load_dataset
from advpipe.errors import AdvpipeError
from advpipe.pipeline.provenance import summarize
from advpipe.pipeline.reader import MaskStore

__all__ = ["TABLE_III", "load_store_data", "store_summary", "table_iii_rows"]

#: (row label, summary key prefix) of advmask.txt Table III: ASR and the l0 (elements and pixels), l2, l_inf norms
TABLE_III = (
    ("ASR", "asr"),
    ("l0 (elements)", "l0"),
    ("l0 (pixels)", "l0_pixels"),
    ("l2", "l2"),
    ("l_inf", "linf"),
)


def store_summary(store: MaskStore, *, recompute: bool = False) -> tuple[dict[str, Any] | None, int]:
    """Return (summary, chunks counted): a complete store's stored summary, else one over its done chunks.

    The summary has the keys of the store's ``summary`` attribute (n, n_clean_correct, n_success,
    asr, and ``<norm>_mean``/``<norm>_median`` over successful images, all over the images classified
    correctly before the attack); it is None if no chunk is done.
    ``recompute`` computes it from the per-image arrays even for a complete store, through the
    same function the store and the evaluation use (:func:`advpipe.attacks.norms.summarize_norms`).
    """
    if store.complete and not recompute:
        return store.provenance["summary"], store.n_chunks
    done = store.chunk_done()
    if not done.any():
        return None, 0
    rows = np.repeat(done, store.chunk_size)[: store.n]
    metrics = {name: values[rows] for name, values in store.metrics().items()}
    return summarize(metrics), int(done.sum())


def table_iii_rows(summary: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """Return Table III as (metric, mean, median) rows; ASR is a fraction with no median, norms are over successes."""
    rows: list[tuple[str, float | None, float | None]] = []
    for label, key in TABLE_III:
        if key == "asr":
            rows.append((label, summary.get("asr"), None))
        else:
            rows.append((label, summary.get(f"{key}_mean"), summary.get(f"{key}_median")))
    return rows


def load_store_data(store: MaskStore, *, data: str | None = None, split: str | None = None,
                    data_dir: str | None = None, limit: int | None = None) -> DatasetSplit:
    """Load the data a store should match: by default its provenance's dataset and split, first ``n`` samples.

    ``--limit`` keeps a prefix of a split, so a store made with ``--limit N`` is matched by the
    first N samples; the caller compares fingerprints and per-sample hashes.
    """
    ds_info = store.provenance["dataset"]
    name = data or ds_info["name"]
    split = split or ds_info["split"]
    if limit is not None and limit < 1:
        raise AdvpipeError(f"limit must be a positive number of samples, got {limit}", fields=("limit",))
    return load_dataset(name, split, data_dir=data_dir, limit=limit or store.n, image_size=store.image_shape[1])
