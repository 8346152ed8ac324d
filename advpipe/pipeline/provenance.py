"""Provenance attributes of a mask store: validate what callers give and what foreign stores hold.

Stores come from other teams, so every attribute read back is checked for type and range before
use; nothing is ever evaluated.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from typing import Any

import numcodecs
import numpy as np
import torch
import zarr

import advpipe
from advpipe.errors import AdvpipeError
from advpipe.pipeline.codecs import FORMAT, MASK_HASH_RULE, SAMPLE_HASH_RULE, format_eps

MAX_N = 100_000_000
MAX_CHANNELS = 64
MAX_SIDE = 8192
MAX_CHUNK_BYTES = 1 << 30  # decoded bool masks of one chunk
MAX_CHUNKS = 1_000_000  # write units: each is about 11 objects
MAX_TEXT = 4096
STATUSES = ("in-progress", "complete")
SUMMARY_STATS = ("l0", "l0_pixels", "l2", "linf")
_SHA256 = re.compile(r"[0-9a-f]{64}")

CALLER_KEYS = {
    "dataset": ("name", "split", "fingerprint"),
    "model": ("arch", "checkpoint_sha256", "clean_accuracy"),
}


def now() -> str:
    """Return the current UTC time as an ISO 8601 string to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Return the versions of the libraries that shape the stored bytes and results."""
    return {
        "advpipe": advpipe.__version__,
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": np.__version__,
    }


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise AdvpipeError(f"{where} must be a non-empty string of at most {MAX_TEXT} characters, got {value!r:.80}")
    return value


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise AdvpipeError(f"{where} must be an integer in [{lo}, {hi}], got {value!r:.80}")
    return value


def _fraction(value: Any, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise AdvpipeError(f"{where} must be a fraction in [0, 1], got {value!r:.80}")
    return float(value)


def _sha256(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise AdvpipeError(f"{where} must be 64 lowercase hex digits (a sha256), got {value!r:.80}")
    return value


def _section(raw: Any, name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise AdvpipeError(f"provenance[{name!r}] must be a dict with keys {list(keys)}, got {type(raw).__name__}")
    missing = [k for k in keys if k not in raw]
    if missing:
        raise AdvpipeError(f"provenance[{name!r}] lacks {missing}")
    return raw


def _json_value(value: Any, where: str) -> Any:
    """Return ``value`` as plain JSON (tuples become lists); refuse anything else and non-finite floats."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AdvpipeError(f"{where} must be finite, got {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise AdvpipeError(f"{where} keys must be strings")
        return {k: _json_value(v, f"{where}.{k}") for k, v in value.items()}
    raise AdvpipeError(f"{where} must be JSON data (str, int, float, bool, None, list, dict), got {type(value).__name__}")


def image_shape_of(value: Any, where: str = "image_shape") -> tuple[int, int, int]:
    """Validate a (C,H,W) image shape and return it as a tuple."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise AdvpipeError(f"{where} must be (C, H, W), got {value!r:.80}")
    c = _int(value[0], f"{where}[0] (channels)", 1, MAX_CHANNELS)
    h = _int(value[1], f"{where}[1] (height)", 1, MAX_SIDE)
    w = _int(value[2], f"{where}[2] (width)", 1, MAX_SIDE)
    return c, h, w


def check_layout(n: int, image_shape: tuple[int, int, int], chunk_size: int, where: str = "") -> None:
    """Refuse an N, shape or chunk size that no real dataset has (or that would decode absurd chunks)."""
    _int(n, f"{where}n", 1, MAX_N)
    _int(chunk_size, f"{where}chunk_size", 1, MAX_N)
    if -(-n // chunk_size) > MAX_CHUNKS:
        raise AdvpipeError(f"{where}chunk_size {chunk_size} splits {n} samples into more than {MAX_CHUNKS} chunks")
    chunk_bytes = min(chunk_size, n) * image_shape[1] * image_shape[2]
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise AdvpipeError(
            f"{where}chunk_size {chunk_size} of {image_shape[1]}x{image_shape[2]} masks decodes to "
            f"{chunk_bytes} bytes per chunk (limit {MAX_CHUNK_BYTES})"
        )


def new_attrs(provenance: Any, *, n: int, image_shape: tuple[int, int, int], chunk_size: int) -> dict[str, Any]:
    """Validate the caller's provenance dict and return the full attribute block of a new store.

    ``provenance`` has exactly the keys ``dataset`` (name, split, fingerprint), ``model`` (arch,
    checkpoint_sha256, clean_accuracy as a fraction in [0,1]), ``attack`` (every hyperparameter,
    JSON data; ``eps`` is stored as a fraction string) and ``seed`` (int).
    """
    if not isinstance(provenance, dict):
        raise AdvpipeError(f"provenance must be a dict, got {type(provenance).__name__}")
    unknown = sorted(set(provenance) - {"dataset", "model", "attack", "seed"})
    if unknown:
        raise AdvpipeError(f"unknown provenance keys {unknown}; expected dataset, model, attack, seed")
    sections = {name: _section(provenance.get(name), name, keys) for name, keys in CALLER_KEYS.items()}
    for name, keys in CALLER_KEYS.items():
        extra = sorted(set(sections[name]) - set(keys))
        if extra:
            raise AdvpipeError(f"unknown provenance[{name!r}] keys {extra}; expected {list(keys)}")
    attack = provenance.get("attack")
    if not isinstance(attack, dict) or not attack:
        raise AdvpipeError("provenance['attack'] must be a non-empty dict of every attack hyperparameter")
    attack = _json_value(attack, "provenance.attack")
    if "eps" in attack:
        attack["eps"] = format_eps(attack["eps"])
    if "seed" not in provenance:
        raise AdvpipeError("provenance lacks 'seed'")
    image_shape = image_shape_of(image_shape)
    check_layout(n, image_shape, chunk_size)
    ds, model = sections["dataset"], sections["model"]
    return {
        "format": FORMAT,
        "status": "in-progress",
        "created": now(),
        "completed": None,
        "dataset": {
            "name": _text(ds["name"], "dataset.name"),
            "split": _text(ds["split"], "dataset.split"),
            "fingerprint": _text(ds["fingerprint"], "dataset.fingerprint"),
            "n": n,
            "image_shape": list(image_shape),
        },
        "model": {
            "arch": _text(model["arch"], "model.arch"),
            "checkpoint_sha256": _sha256(model["checkpoint_sha256"], "model.checkpoint_sha256"),
            "clean_accuracy": _fraction(model["clean_accuracy"], "model.clean_accuracy"),
        },
        "attack": attack,
        "seed": _int(provenance["seed"], "seed", -(2**63), 2**64 - 1),
        "chunk_size": chunk_size,
        "sample_hash": SAMPLE_HASH_RULE,
        "mask_hash": MASK_HASH_RULE,  # its presence says the store has the mask_hash array
        "versions": versions(),
        "resumed": [],
        "summary": None,
    }


def config_of(attrs: dict[str, Any]) -> dict[str, Any]:
    """Return the subset of the attributes that must match for a resume to continue the same work."""
    return {
        "format": attrs["format"],
        "dataset": attrs["dataset"],
        "model.checkpoint_sha256": attrs["model"]["checkpoint_sha256"],
        "attack": attrs["attack"],
        "seed": attrs["seed"],
        "chunk_size": attrs["chunk_size"],
    }


def config_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Describe every leaf where two configs differ, as ``key: store X vs requested Y``."""

    def leaves(d: Any, prefix: str) -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(leaves(v, f"{prefix}.{k}" if prefix else k))
            return out
        return {prefix: d}

    a, b = leaves(stored, ""), leaves(wanted, "")

    def show(d: dict[str, Any], k: str) -> str:
        return json.dumps(d[k]) if k in d else "(absent)"

    missing = object()
    return [
        f"{k}: store {show(a, k)} vs requested {show(b, k)}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def parse_attrs(raw: Any) -> dict[str, Any]:
    """Validate the attribute block of a (possibly foreign) store and return it; AdvpipeError if malformed."""
    if not isinstance(raw, dict):
        raise AdvpipeError(f"not an advpipe mask store: the group has no {FORMAT!r} attribute block")
    fmt = raw.get("format")
    if fmt != FORMAT:
        raise AdvpipeError(f"unsupported store format {fmt!r:.80}; this advpipe reads {FORMAT!r}")
    if raw.get("status") not in STATUSES:
        raise AdvpipeError(f"store status must be one of {list(STATUSES)}, got {raw.get('status')!r:.80}")
    ds = raw.get("dataset")
    if not isinstance(ds, dict):
        raise AdvpipeError("store attribute 'dataset' must be a dict")
    for key in ("name", "split", "fingerprint"):
        _text(ds.get(key), f"store dataset.{key}")
    image_shape = image_shape_of(ds.get("image_shape"), "store dataset.image_shape")
    n = _int(ds.get("n"), "store dataset.n", 1, MAX_N)
    chunk_size = _int(raw.get("chunk_size"), "store chunk_size", 1, MAX_N)
    check_layout(n, image_shape, chunk_size, where="store ")
    model = raw.get("model")
    if not isinstance(model, dict):
        raise AdvpipeError("store attribute 'model' must be a dict")
    _text(model.get("arch"), "store model.arch")
    _sha256(model.get("checkpoint_sha256"), "store model.checkpoint_sha256")
    _fraction(model.get("clean_accuracy"), "store model.clean_accuracy")
    if not isinstance(raw.get("attack"), dict):
        raise AdvpipeError("store attribute 'attack' must be a dict")
    _int(raw.get("seed"), "store seed", -(2**63), 2**64 - 1)
    if not isinstance(raw.get("resumed", []), list):
        raise AdvpipeError("store attribute 'resumed' must be a list")
    summary = raw.get("summary")
    if raw["status"] == "complete" and not isinstance(summary, dict):
        raise AdvpipeError("a complete store must carry a 'summary' dict")
    return raw


def summarize(metrics: dict[str, np.ndarray]) -> dict[str, Any]:
    """Return the ASR and mean/median l0, l0_pixels, l2, linf over the images classified correctly before the attack.

    ``metrics`` holds the per-image arrays (``success``, ``clean_correct`` and the norms). Images the
    model already misclassifies are counted in ``n`` only: they "succeed" with an empty mask and
    would inflate the ASR and deflate the norms (Table III attacks correctly classified images, as
    ``advpipe evaluate`` counts robustness). Means and medians are ``None`` when no image was
    attacked successfully.
    """
    attacked = np.asarray(metrics["clean_correct"], dtype=bool)
    chosen = attacked & np.asarray(metrics["success"], dtype=bool)
    return summary_of(len(attacked), int(attacked.sum()), int(chosen.sum()),
                      {name: np.asarray(metrics[name])[chosen] for name in SUMMARY_STATS})


def summary_of(n: int, n_attacked: int, n_success: int, norms: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """The store summary from its counts and the norms of the successful attacked images (None: counts only).

    One code path with the evaluation's statistics (:func:`advpipe.attacks.norms.summarize_norms`),
    flattened into the store's attribute keys; ``verify`` builds it chunk by chunk.
    """
    from advpipe.attacks.norms import summarize_norms

    summary: dict[str, Any] = {"n": n, "n_clean_correct": n_attacked, "n_success": n_success,
                               "asr": n_success / n_attacked if n_attacked else None}
    if norms is not None:
        shared = summarize_norms(norms, np.ones(n_success, dtype=bool))
        for name in SUMMARY_STATS:
            summary[f"{name}_mean"] = shared[name]["mean"]
            summary[f"{name}_median"] = shared[name]["median"]
    return summary
