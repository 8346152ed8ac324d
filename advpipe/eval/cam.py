"""Grad-CAM class-activation maps (Selvaraju et al., ICCV 2017) and the image-plus-CAM grid of AdvMask Fig. 3.

For a feature map A (B,K,h,w) of a chosen layer and the logit y_c of class c, Grad-CAM is
``ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the spatial mean of ``d y_c / d A_k``, upsampled
bilinearly to the image and scaled to [0, 1] per image. For networks that end in global average
pooling and one linear layer, as all of ours do, it equals CAM (Zhou et al. 2016, the map of
advmask.txt Fig. 3) at the last block, up to a positive factor. The class is the true label, so
the maps show where each model finds the object.

**Layer.** :func:`cam_layer` picks the last module (in forward order; a container counts after its
children) whose output is a feature map at least :data:`MIN_SIDE` pixels on each side, i.e. the
last conv block before pooling: ``layer3`` for the CIFAR ResNet-20..110 (8x8 at 32 px),
``layer4`` for ResNet-18/34/50 (4x4), the final ``bn`` for WRN-28-10 (8x8), the last ReLU of
VGG's fourth block (4x4; the fifth block is 2x2), ``layer4`` for torchvision ResNets at 224 px.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from advpipe.data.datasets import load_dataset
from advpipe.errors import AdvpipeError
from advpipe.models.build import model_from_checkpoint
from advpipe.models.checkpoint import load_checkpoint
from advpipe.devices import resolve_device
from advpipe.files import sha256_file
from advpipe.eval.images import save_image_grid

#: the CAM grid's file name in a report folder
CAM_FILENAME = "cams.png"
#: the smallest feature-map side Grad-CAM is taken at (coarser maps say little on 32 px images)
MIN_SIDE = 4


def cam_layer(model: nn.Module, image_shape: Sequence[int]) -> str:
    """Name (as in ``named_modules``) of the module whose output Grad-CAM uses; see the module docstring."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: seen.append((name, tuple(o.shape)))
                                          if isinstance(o, torch.Tensor) else None)
             for name, module in model.named_modules() if name]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, *image_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    maps = [(name, shape) for name, shape in seen if len(shape) == 4]
    if not maps:
        raise AdvpipeError("the model has no module with a (B,C,H,W) output to take Grad-CAM at")
    large = [name for name, shape in maps if min(shape[-2:]) >= MIN_SIDE]
    return large[-1] if large else maps[-1][0]


def grad_cam(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *,
             layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps (B,H,W) in [0,1] for class ``targets`` (B,), and the logits (B,K).

    The model runs in eval mode (restored afterwards); only the feature map's gradient is
    computed, parameters' ``.grad`` are untouched.
    """
    name = layer or cam_layer(model, images.shape[1:])
    module = dict(model.named_modules()).get(name)
    if module is None:
        raise AdvpipeError(f"the model has no layer {name!r}")
    captured: list[torch.Tensor] = []

    def hook(m: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        captured.append(output)
        return output.clone()  # later in-place ops (e.g. ReLU(inplace=True)) must not touch the map

    handle = module.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(images.detach())
            activation = captured[-1]
            score = logits.float().gather(1, targets.view(-1, 1).to(logits.device)).sum()
            (grad,) = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
        model.train(was_training)
    weights = grad.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation.detach().float()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return cam / peak, logits.detach()


def overlay(images: torch.Tensor, cams: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend (B,C,H,W) [0,1] images with the jet colour map of (B,H,W) CAMs, as in AdvMask Fig. 3."""
    from matplotlib import colormaps

    heat = torch.from_numpy(colormaps["jet"](cams.detach().cpu().numpy())[..., :3]).permute(0, 3, 1, 2).float()
    rgb = images.detach().cpu().float()
    rgb = rgb.expand(-1, 3, -1, -1) if rgb.shape[1] == 1 else rgb
    return ((1 - alpha) * rgb + alpha * heat).clamp(0, 1)


def save_cam_grid(images: torch.Tensor, labels: Sequence[int], class_names: Sequence[str],
                  runs: Sequence[tuple[str, torch.Tensor, torch.Tensor]], path: str | Path) -> Path:
    """One row per image: the image, then each run's CAM overlay titled with its prediction.

    ``runs`` holds (name, cams (N,H,W), predictions (N,)) per model.
    """
    rows, titles = [], []
    for i in range(len(images)):
        cells = [images[i].detach().cpu().float()] + [overlay(images[i: i + 1], cams[i: i + 1])[0] for _, cams, _ in runs]
        rows.append(torch.stack([c.expand(3, -1, -1) if c.shape[0] == 1 else c for c in cells]))
        names = [f"{name}\n" if i == 0 else "" for name, _, _ in runs]
        titles.append([("image\n" if i == 0 else "") + class_names[int(labels[i])]]
                      + [f"{n}pred {class_names[int(pred[i])]}" for n, (_, _, pred) in zip(names, runs)])
    return save_image_grid(rows, path, cell_titles=titles, title="Grad-CAM, true class")


def checkpoint_cams(checkpoint: str | Path, images: torch.Tensor, labels: torch.Tensor, *,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Load a checkpoint and return its Grad-CAM maps, predictions and the layer used."""
    model = model_from_checkpoint(load_checkpoint(checkpoint), source=str(checkpoint)).to(device).eval()
    layer = cam_layer(model, images.shape[1:])
    cams, logits = grad_cam(model, images.to(device), labels.to(device), layer=layer)
    return cams.cpu(), logits.argmax(1).cpu(), layer


def first_images(data: str, split: str, n: int, *, data_dir: str | None = None,
                 image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``n`` images of a split as (n,C,H,W) floats in [0,1], their labels and the class names."""
    if n < 1:
        raise AdvpipeError(f"the number of CAM images must be at least 1, got {n}")
    ds = load_dataset(data, split, data_dir=data_dir, limit=n, image_size=image_size)
    return ds.load_images(range(len(ds))).float() / 255, ds.labels[: len(ds)].long(), list(ds.class_names)


def save_run_cams(runs: Iterable[tuple[str, Path, dict[str, Any]]], n: int, path: str | Path,
                  device: str = "auto") -> Path:
    """CAM grid of several evaluated runs: (name, folder, eval.json dict) each, on the first run's test data.

    Each run's checkpoint is the one its evaluation recorded (its path, else the file of that
    name in the run folder), and must still have the recorded sha256.
    """
    runs = list(runs)
    checkpoints = [_recorded_checkpoint(folder, result) for _, folder, result in runs]
    first = runs[0][2]
    data, params = first["data"], first.get("params", {})
    images, labels, names = first_images(data["name"], data["split"], n, data_dir=params.get("data_dir"),
                                         image_size=load_checkpoint(checkpoints[0]).image_size)
    dev = resolve_device(device)
    columns = []
    for (name, _, _), ckpt in zip(runs, checkpoints):
        cams, preds, _ = checkpoint_cams(ckpt, images, labels, device=dev)
        columns.append((name, cams, preds))
    return save_cam_grid(images, labels.tolist(), names, columns, path)


def _recorded_checkpoint(folder: Path, result: dict[str, Any]) -> Path:
    info = result.get("checkpoint", {})
    recorded = Path(str(info.get("path", "")))
    for candidate in (recorded, Path(folder) / recorded.name):
        if candidate.is_file():
            if info.get("sha256") and sha256_file(candidate) != info["sha256"]:
                raise AdvpipeError(f"{candidate} changed since it was evaluated (sha256 differs from the one in "
                                   f"{Path(folder) / 'eval.json'}); evaluate it again before drawing its CAMs")
            return candidate
    raise AdvpipeError(f"cannot find the checkpoint {str(recorded)!r} evaluated for {folder}; the CAM grid needs it")
