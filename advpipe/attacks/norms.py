"""Perturbation norms and their summary: the one code path for l0/l2/l_inf and ASR.

The sparse attack, the mask store's summary and ``advpipe evaluate`` all measure perturbations
with these two functions, so Table III figures mean the same everywhere.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

#: the names of :func:`perturbation_norms`' outputs, in order
NORM_NAMES = ("l0_elements", "l0_pixels", "l2", "linf")


def perturbation_norms(delta: torch.Tensor, *, atol: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-sample norms of a (B,C,H,W) perturbation: l0 elements, l0 pixels, l2 and l_inf, each (B,).

    An element counts for l0 when ``|delta| > atol``; a pixel counts when any of its channels does
    (AdvMask's l0 counts elements, about 3x the pixel count on RGB; see advmask.txt Table III).
    All values are float32 on ``delta``'s device.
    """
    if delta.dim() != 4:
        raise ValueError(f"delta must have shape (B,C,H,W), got {tuple(delta.shape)}")
    d = delta.detach().float()
    changed = d.abs() > atol
    flat = d.flatten(1)
    return {
        "l0_elements": changed.flatten(1).sum(1).float(),
        "l0_pixels": changed.any(dim=1).flatten(1).sum(1).float(),
        "l2": flat.norm(p=2, dim=1) if flat.shape[1] else flat.sum(1),
        "linf": flat.abs().amax(dim=1) if flat.shape[1] else flat.sum(1),
    }


def summarize_norms(norms: Mapping[str, torch.Tensor | np.ndarray],
                    success: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """Attack success rate over the given samples and mean/median of each norm over the successes.

    ``norms`` maps names to (N,) tensors (e.g. :func:`perturbation_norms` outputs, concatenated
    over batches; numpy arrays work too) and ``success`` is (N,) bool. ASR = successes / N
    (advmask.txt Sec. V-A: the share of adversarial samples that are misclassified). Means and
    medians (the average of the two middle values for an even count, as numpy's) over an empty
    set are ``None`` so the result stays valid JSON.
    """
    success = torch.as_tensor(success).detach().bool().flatten().cpu()
    n, k = int(success.numel()), int(success.sum())
    out: dict[str, Any] = {"n": n, "successes": k, "asr": k / n if n else None}
    for name, values in norms.items():
        values = torch.as_tensor(values).detach().double().flatten().cpu()
        if values.numel() != n:
            raise ValueError(f"norm {name!r} has {values.numel()} values for {n} samples")
        chosen = values[success]
        out[name] = ({"mean": float(chosen.mean()), "median": float(chosen.quantile(0.5))} if k
                     else {"mean": None, "median": None})
    return out
