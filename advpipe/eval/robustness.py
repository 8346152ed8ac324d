"""Robustness measurement: accuracy under attacks and corruptions, scores, perturbation norms.

* :func:`accuracy_pass` runs one pass over a loader, optionally perturbing each batch first, and
  keeps per-sample correctness so attack success can be counted against the clean pass.
* :func:`attack_pass` / :func:`corruption_pass` are the two perturbation families.
* :func:`robustness_score` is M-TLAT's ``R = A_perturbed / A_clean`` (m-tlat.txt Eq. 7).
* :func:`perturbation_norms` and :func:`summarize_norms` (in :mod:`advpipe.attacks.norms`) are the
  one code path for l0/l2/l_inf statistics and attack success rates, shared with the sparse
  attack's summary and the mask-store report (AdvMask Table III columns: ASR, l0, l2, l_inf;
  advmask.txt Sec. V-A).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from advpipe import progress
from advpipe.attacks.norms import NORM_NAMES, perturbation_norms, summarize_norms
from advpipe.data.batch import Batch
from advpipe.precision import autocast_context
from advpipe.eval.corruptions import CORRUPTIONS
from advpipe.eval.specs import AttackContext, AttackSpec
from advpipe.rng import stream_seed

Perturb = Callable[[Batch, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- scores


def robustness_score(accuracy: float | None, clean_accuracy: float | None) -> float | None:
    """M-TLAT's robustness score R = A_perturbed / A_clean (m-tlat.txt Eq. 7); None if A_clean is 0."""
    if accuracy is None or not clean_accuracy:
        return None
    return accuracy / clean_accuracy


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


# --------------------------------------------------------------------------- passes


def accuracy_pass(model: nn.Module, batches: Iterable[Batch], num_classes: int, *, perturb: Perturb | None = None,
                  precision: str = "fp32", description: str = "evaluate", total: int | None = None,
                  keep_norms: bool = False) -> dict[str, Any]:
    """One pass: top-1, per-class accuracy and per-sample correctness, optionally on perturbed images.

    ``perturb(batch, images) -> images`` runs before the forward (under the ``precision``
    autocast; fp32 means none) and may need
    gradients (attacks enable them internally). The model is put in eval mode for the pass and
    restored afterwards. Returns ``top1``, ``per_class``, ``n``, ``seconds``, and (not JSON)
    ``_index``/``_correct`` (per-sample, in loader order) plus ``_norms`` when ``keep_norms``.
    """
    was_training = model.training
    model.eval()
    correct_per_class = seen_per_class = None
    indices: list[torch.Tensor] = []
    corrects: list[torch.Tensor] = []
    norms: dict[str, list[torch.Tensor]] = {k: [] for k in NORM_NAMES}
    started = time.perf_counter()
    try:
        for batch in progress.track(batches, description, total=total, unit="batch"):
            images = batch.images
            device = images.device
            if correct_per_class is None:
                correct_per_class = torch.zeros(num_classes, dtype=torch.long, device=device)
                seen_per_class = torch.zeros(num_classes, dtype=torch.long, device=device)
            if perturb is not None:
                with autocast_context(device, precision):
                    images = perturb(batch, images)
                if keep_norms:
                    for k, v in perturbation_norms(images - batch.images).items():
                        norms[k].append(v.cpu())
            with torch.no_grad(), autocast_context(device, precision):
                pred = model(images).argmax(1)
            hit = pred == batch.labels
            seen_per_class.index_add_(0, batch.labels, torch.ones_like(batch.labels))
            correct_per_class.index_add_(0, batch.labels, hit.long())
            indices.append(batch.index.cpu())
            corrects.append(hit.cpu())
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    if correct_per_class is None:
        return {"top1": None, "per_class": [], "n": 0, "seconds": seconds, "_index": torch.zeros(0, dtype=torch.long),
                "_correct": torch.zeros(0, dtype=torch.bool), "_norms": {k: torch.zeros(0) for k in NORM_NAMES}}
    n = int(seen_per_class.sum())
    per_class = (correct_per_class.float() / seen_per_class.clamp(min=1).float()).tolist()
    out = {"top1": float(correct_per_class.sum()) / n, "per_class": per_class, "n": n, "seconds": seconds,
           "images_per_s": n / seconds if seconds > 0 else None,
           "_index": torch.cat(indices), "_correct": torch.cat(corrects)}
    if keep_norms:
        out["_norms"] = {k: torch.cat(v) for k, v in norms.items()}
    return out


def _aligned(result: Mapping[str, Any]) -> torch.Tensor:
    """Per-sample correctness sorted by dataset index (so passes over the same data line up)."""
    return result["_correct"][torch.argsort(result["_index"])]


def public(result: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the per-sample tensors (keys starting with ``_``) from a pass result."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def attack_pass(model: nn.Module, batches: Iterable[Batch], spec: AttackSpec, num_classes: int, *,
                clean: Mapping[str, Any], seed: int = 0, surrogate: nn.Module | None = None,
                precision: str = "fp32", total: int | None = None) -> dict[str, Any]:
    """Accuracy under one attack, its robustness score and the perturbation statistics.

    The attack runs in fp32 unless ``precision`` says otherwise, with the model (and surrogate)
    in eval mode. ``norms`` summarises the perturbations of the samples the model got right on
    clean data; success there means "misclassified after the attack" (for every kind, including
    the targeted PGD-LL, whose robustness is also measured as accuracy).
    """
    generator: torch.Generator | None = None

    def perturb(batch: Batch, images: torch.Tensor) -> torch.Tensor:
        nonlocal generator
        if generator is None:
            generator = torch.Generator(device=images.device).manual_seed(stream_seed(seed, spec.key))
        return spec.run(model, images, batch.labels, AttackContext(generator=generator, surrogate=surrogate))

    surrogate_was_training = surrogate.training if surrogate is not None else False
    if surrogate is not None:
        surrogate.eval()
    try:
        result = accuracy_pass(model, batches, num_classes, perturb=perturb, precision=precision,
                               description=f"attack {spec.label}", total=total, keep_norms=True)
    finally:
        if surrogate is not None:
            surrogate.train(surrogate_was_training)
    order = torch.argsort(result["_index"])
    clean_correct = _aligned(clean)
    success = clean_correct & ~result["_correct"][order]
    norms = {k: v[order][clean_correct] for k, v in result["_norms"].items()}
    out = public(result)
    out.update(spec=spec.key, kind=spec.kind, label=spec.label, params=spec.to_json(),
               robustness=robustness_score(out["top1"], clean.get("top1")),
               norms=summarize_norms(norms, success[clean_correct]))
    return out


def corruption_pass(model: nn.Module, loader: Iterable[Batch], name: str, severities: Sequence[int],
                    num_classes: int, *, clean: Mapping[str, Any], seed: int = 0, precision: str = "fp32",
                    total: int | None = None) -> dict[str, Any]:
    """Accuracy and robustness score of one corruption at each severity, plus their means.

    Each (corruption, severity) draws from its own generator seeded by :func:`stream_seed`, so a
    result does not depend on which other corruptions are evaluated.
    """
    corruption = CORRUPTIONS.get(name)
    levels = []
    for severity in severities:
        generator: torch.Generator | None = None

        def perturb(batch: Batch, images: torch.Tensor, severity: int = severity) -> torch.Tensor:
            nonlocal generator
            if generator is None:
                generator = torch.Generator(device=images.device).manual_seed(stream_seed(seed, f"{name}:{severity}"))
            return corruption(images, severity, generator=generator)

        result = public(accuracy_pass(model, loader, num_classes, perturb=perturb, precision=precision,
                                      description=f"{name} s{severity}", total=total))
        levels.append({"severity": severity, "params": dict(corruption.level(severity)), "top1": result["top1"],
                       "robustness": robustness_score(result["top1"], clean.get("top1")),
                       "per_class": result["per_class"], "n": result["n"], "seconds": result["seconds"]})
    return {
        "name": name,
        "family": corruption.family,
        "source": corruption.source,
        "severities": levels,
        "top1": mean_or_none(lv["top1"] for lv in levels),
        "robustness": mean_or_none(lv["robustness"] for lv in levels),
        "seconds": sum(lv["seconds"] for lv in levels),
    }
