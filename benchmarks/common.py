"""Shared benchmark plumbing: machine description and JSON results."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """Describe the machine a benchmark ran on."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return info


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``result`` plus machine info to ``benchmarks/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine(), **result}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def time_it(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 3, sync: Callable[[], None] | None = None) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def compare_outputs(old: str, new: str) -> int:
    """Print every output of ``old`` that ``new`` does not reproduce exactly; return their count."""
    a, b = torch.load(old, weights_only=False), torch.load(new, weights_only=False)  # our own digest files
    bad = 0
    for k in a:
        u, v = a[k], b.get(k)
        if isinstance(u, torch.Tensor):
            same = isinstance(v, torch.Tensor) and u.shape == v.shape and u.dtype == v.dtype and torch.equal(u, v)
            if not same:
                bad += 1
                print("DIFF", k, (u.float() - v.float()).abs().max().item()
                      if isinstance(v, torch.Tensor) and u.shape == v.shape else "missing or shape")
        elif isinstance(u, dict):
            for kk in u:
                x, y = u[kk], (v or {}).get(kk)
                if not (x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))):
                    print("DIFF", k, kk, x, y)
                    bad += 1
        elif u != v:
            print("DIFF", k, u, v)
            bad += 1
    print(f"compared {len(a)} outputs, {bad} differences")
    return bad

