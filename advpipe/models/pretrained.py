"""Pretrained weights: finding them, loading them into a model, and the normalization they were trained with.

A source is a local file or a library's own weights:

- ``.safetensors`` (read with safetensors), ``.pth``/``.pt``/``.bin``/``.ckpt`` (read with
  ``torch.load(weights_only=True)``, which refuses any pickled object other than tensors and
  plain containers and never runs code): a torchvision or timm state dict, a training
  checkpoint holding one under ``state_dict``/``model``/``model_state``, or an advpipe checkpoint;
- ``torchvision`` (or ``torchvision:TAG`` such as ``torchvision:IMAGENET1K_V2``): the model's
  torchvision weights from the torch hub cache (``$TORCH_HOME/hub/checkpoints``);
- ``timm``: the timm model's pretrained weights (for its tag) from the Hugging Face cache
  (``$HF_HUB_CACHE``) or, for URL-hosted weights, the torch hub cache.

A library source is downloaded only with ``download=True``; otherwise a missing file raises
AdvpipeError saying how to get it. The classifier head is loaded when its shape fits and left
freshly initialised (replaced) when the class count differs; everything else loads strictly, so
weights of another architecture raise AdvpipeError in one line.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from advpipe.errors import AdvpipeError
from advpipe.models.checkpoint import FORMAT, check_weights_file, load_checkpoint, non_finite_tensors
from advpipe.models.external import split_arch

log = logging.getLogger(__name__)

Normalization = tuple[tuple[float, ...], tuple[float, ...]]
#: the library sources; anything else is a file path
LIBRARY_SOURCES = ("torchvision", "timm")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
#: keys under which training checkpoints keep the state dict (timm, torchvision references, Lightning)
_STATE_KEYS = ("state_dict", "model", "model_state")
#: prefixes a wrapper adds to every key (DDP, torch.compile)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Weights:
    """A state dict read from a source, with the metadata that came with it."""

    state: dict[str, torch.Tensor]
    #: where the weights came from, for messages (a path or e.g. ``torchvision ResNet18_Weights.IMAGENET1K_V1``)
    source: str
    #: the weights' own normalization, when the source records it
    normalization: Normalization | None = None
    #: the architecture an advpipe checkpoint was saved for
    arch: str | None = None


def load_pretrained(model: nn.Module, arch: str, source: str, *, download: bool = False) -> Normalization | None:
    """Load ``source``'s weights into ``model`` (built as ``arch``) and return their normalization.

    The head is replaced when the class count differs; the rest loads strictly (AdvpipeError on
    another architecture's weights). The normalization is the source's own (advpipe checkpoint,
    safetensors metadata, torchvision weights meta), else the architecture's pretrained metadata
    (timm ``pretrained_cfg``, torchvision default weights), else None (the caller keeps the data's).
    """
    weights = read_source(source, arch, model, download=download)
    if weights.arch is not None and weights.arch != arch:
        raise AdvpipeError(f"{weights.source} is an advpipe checkpoint of {weights.arch}, not of {arch}; "
                           f"pass model {weights.arch} or weights of {arch}", fields=("model", "pretrained"))
    load_state(model, weights.state, arch, weights.source)
    norm = weights.normalization or architecture_normalization(model, arch)
    log.info("pretrained weights %s loaded into %s (normalization mean=%s std=%s)", weights.source, arch,
             *(norm if norm else ("of the data", "of the data")))
    return norm


def read_source(source: str, arch: str, model: nn.Module, *, download: bool = False) -> Weights:
    """Read the weights ``source`` names (a file, ``torchvision[:TAG]`` or ``timm``) for ``arch``."""
    kind, _, tag = source.partition(":")
    if kind in LIBRARY_SOURCES and not Path(source).exists():
        library, name = split_arch(arch)
        if kind == "timm":
            if tag:
                raise AdvpipeError(f"pretrained timm takes no tag; put it in the model name "
                                   f"(e.g. timm:{name.split('.')[0]}.{tag})", fields=("pretrained", "model"))
            if library != "timm":
                raise AdvpipeError(f"pretrained timm needs model timm:NAME, not {arch!r}",
                                   fields=("pretrained", "model"))
            return _timm_weights(name, model, download)
        if library == "timm":
            raise AdvpipeError(f"pretrained torchvision needs a torchvision architecture, not {arch!r}; use "
                               "pretrained timm for timm models", fields=("pretrained", "model"))
        if library == "advpipe" and _is_registered(arch):
            raise AdvpipeError(f"{arch} is the CIFAR architecture of advpipe, which has no torchvision weights; "
                               f"use model torchvision:{arch} for the torchvision one", fields=("pretrained", "model"))
        return _torchvision_weights(name, tag or None, download)
    return read_weights_file(Path(source))


def read_weights_file(path: Path) -> Weights:
    """Read a local ``.safetensors`` or ``torch.load(weights_only=True)`` weights file; refuse anything else."""
    check_weights_file(path, "weights file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix not in _TORCH_SUFFIXES:
        raise AdvpipeError(f"weights file {str(path)!r}: unknown type {suffix or '(no suffix)'!r}; use .safetensors "
                           f"or {', '.join(_TORCH_SUFFIXES)}", fields=("pretrained",))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise AdvpipeError(f"{path} is refused: it holds pickled objects other than tensors{what}; weights are read "
                           "with torch.load(weights_only=True), which never runs code", fields=("pretrained",)) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdvpipeError(f"{path} is not a readable weights file ({first[:160]})", fields=("pretrained",)) from exc
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        ckpt = load_checkpoint(path)  # validates every field
        return Weights(ckpt.model_state, str(path), (ckpt.mean, ckpt.std), ckpt.arch)
    return Weights(_state_dict(payload, path), str(path))


def load_state(model: nn.Module, state: dict[str, torch.Tensor], arch: str, source: str) -> None:
    """Load ``state`` into ``model``: the head if it fits, else a fresh head; every other tensor strictly."""
    if split_arch(arch)[0] == "timm":
        state = _timm_filter(state, model, arch, source)
    bad = non_finite_tensors(state)
    if bad:
        raise AdvpipeError(f"{source}: {len(bad)} weight tensors hold NaN or infinite values (first {bad[0]!r})")
    own = model.state_dict()
    prefixes = head_prefixes(model)
    head = [k for k in own if _under(k, prefixes)]
    file_head = [k for k in state if _under(k, prefixes)]
    body = {k: v for k, v in state.items() if k not in file_head}
    differ = [k for k in body if k in own and tuple(body[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in head and k not in body and not k.endswith("num_batches_tracked")]
    extra = [k for k in body if k not in own]
    if differ or missing:
        first = (f" (first {differ[0]!r}: {list(body[differ[0]].shape)} in the file, {list(own[differ[0]].shape)} "
                 f"in {arch})") if differ else f" (first missing {missing[0]!r})"
        raise AdvpipeError(f"{source} does not fit {arch}: {len(differ)} tensors differ in shape, {len(missing)} of "
                           f"its {len(own)} tensors are missing and {len(extra)} are extra{first}; are these weights "
                           "of another architecture?", fields=("pretrained", "model"))
    if extra:
        log.warning("%s: ignored %d tensors that %s does not have (first %r)", source, len(extra), arch, extra[0])
    merged = {**own, **{k: v for k, v in body.items() if k in own}}
    if head and sorted(file_head) == sorted(head) and all(state[k].shape == own[k].shape for k in head):
        merged.update({k: state[k] for k in head})
    elif head:
        had = next((tuple(state[k].shape)[0] for k in file_head if k.endswith("weight")), None)
        log.warning("%s: classifier head %s replaced for %d classes (%s); it starts untrained", source,
                    "/".join(prefixes), own[head[0]].shape[0],
                    f"the weights have {had}" if had is not None else "the weights have none")
    model.load_state_dict(merged, strict=True)


def head_prefixes(model: nn.Module) -> list[str]:
    """The classifier head's module names: timm's ``pretrained_cfg['classifier']``, else the last Linear/Conv2d."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("classifier"):
        named = cfg["classifier"]
        return [named] if isinstance(named, str) else list(named)
    for kind in (nn.Linear, nn.Conv2d):
        names = [name for name, module in model.named_modules() if isinstance(module, kind) and name]
        if names:
            return [names[-1]]
    return []


def architecture_normalization(model: nn.Module, arch: str) -> Normalization | None:
    """The mean/std the architecture's pretrained weights expect (timm pretrained_cfg, torchvision DEFAULT meta)."""
    library, name = split_arch(arch)
    cfg = getattr(model, "pretrained_cfg", None)
    if library == "timm" and isinstance(cfg, dict) and cfg.get("mean") and cfg.get("std"):
        return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    if library == "torchvision" or (library == "advpipe" and not _is_registered(arch)):
        import torchvision

        try:
            default = torchvision.models.get_model_weights(name).DEFAULT
        except (ValueError, KeyError, AttributeError):
            return None
        return _transforms_normalization(default)
    return None


# --------------------------------------------------------------------------- the sources


def _read_safetensors(path: Path) -> Weights:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdvpipeError(f"{path} is not a readable safetensors file ({str(exc)[:160]})",
                           fields=("pretrained",)) from exc
    return Weights(_strip_wrappers(state), str(path), _metadata_normalization(meta, path))


def _metadata_normalization(meta: dict[str, str], path: Path) -> Normalization | None:
    """``mean``/``std`` recorded in safetensors metadata as JSON lists, if any."""
    if "mean" not in meta or "std" not in meta:
        return None
    try:
        mean, std = (tuple(float(v) for v in json.loads(meta[k])) for k in ("mean", "std"))
    except (ValueError, TypeError) as exc:
        raise AdvpipeError(f"{path}: metadata mean/std must be JSON lists of numbers", fields=("pretrained",)) from exc
    if not mean or len(mean) != len(std) or min(std) <= 0:
        raise AdvpipeError(f"{path}: metadata mean={list(mean)} std={list(std)} is not a normalization",
                           fields=("pretrained",))
    return mean, std


def _state_dict(payload: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a torch.load payload: the payload itself or one under a usual key."""
    if isinstance(payload, dict) and not _all_tensors(payload):
        payload = next((payload[k] for k in _STATE_KEYS if isinstance(payload.get(k), dict)), payload)
    if not isinstance(payload, dict) or not payload or not _all_tensors(payload):
        raise AdvpipeError(f"{path} holds no state dict (a mapping of names to tensors, alone or under "
                           f"{'/'.join(_STATE_KEYS)})", fields=("pretrained",))
    return _strip_wrappers(dict(payload))


def _all_tensors(mapping: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _torchvision_weights(name: str, tag: str | None, download: bool) -> Weights:
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError as exc:
        raise AdvpipeError(f"torchvision has no weights for {name!r}", fields=("pretrained",)) from exc
    try:
        chosen = enum.DEFAULT if tag is None else enum[tag]
    except KeyError as exc:
        raise AdvpipeError(f"torchvision has no {tag!r} weights for {name}; choose from: "
                           f"{', '.join(w.name for w in enum)}", fields=("pretrained",)) from exc
    path = _hub_cached(chosen.url, f"torchvision {enum.__name__}.{chosen.name}", download)
    weights = read_weights_file(path)
    weights.source = f"torchvision {enum.__name__}.{chosen.name} ({path})"
    weights.normalization = _transforms_normalization(chosen)
    return weights


def _timm_weights(name: str, model: nn.Module, download: bool) -> Weights:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    label = f"timm {cfg.get('architecture', name)}.{cfg.get('tag') or 'default'}"
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if hub_id:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError

        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        found = next((p for p in (try_to_load_from_cache(hub_id, n, cache_dir=constants.HF_HUB_CACHE)
                                  for n in names) if isinstance(p, str)), None)
        if found is None and download:
            for filename in names:
                try:
                    found = hf_hub_download(hub_id, filename)
                    break
                except EntryNotFoundError:
                    continue
        if found is None:
            raise AdvpipeError(f"{label} weights ({hub_id}: {' or '.join(names)}) are not in the Hugging Face cache "
                               f"{constants.HF_HUB_CACHE}; pass download to fetch them (needs internet), or "
                               "pretrained FILE", fields=("download", "pretrained"))
        path = Path(found)
    elif url:
        path = _hub_cached(url, label, download)
    else:
        raise AdvpipeError(f"timm has no weights for {name!r}", fields=("pretrained",))
    weights = read_weights_file(path)
    weights.source = f"{label} ({path})"
    if cfg.get("mean") and cfg.get("std"):
        weights.normalization = (tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]))
    return weights


def _hub_cached(url: str, label: str, download: bool) -> Path:
    """The torch hub cache's file for ``url``; downloaded (hash-checked) only when ``download``."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not path.is_file():
        if not download:
            raise AdvpipeError(f"{label} weights ({path.name}) are not in the torch hub cache {path.parent}; pass "
                               "download to fetch them (needs internet), or pretrained FILE",
                               fields=("download", "pretrained"))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=_hash_prefix(path.name), progress=True)
    return path


def _hash_prefix(filename: str) -> str | None:
    """The sha256 prefix torch hub names its files with (``resnet18-f37072fd.pth``), as torch.hub checks it."""
    found = re.search(r"-([a-f0-9]{6,})\.", filename)
    return found.group(1) if found else None


def _transforms_normalization(weights: object) -> Normalization | None:
    transforms = weights.transforms()  # type: ignore[attr-defined]
    mean, std = getattr(transforms, "mean", None), getattr(transforms, "std", None)
    return (tuple(float(v) for v in mean), tuple(float(v) for v in std)) if mean and std else None


def _timm_filter(state: dict[str, torch.Tensor], model: nn.Module, arch: str, source: str) -> dict[str, torch.Tensor]:
    """Apply the timm model module's ``checkpoint_filter_fn`` (original-format weights -> timm's), if it has one."""
    import timm

    module = sys.modules.get(timm.models.model_entrypoint(split_arch(arch)[1].split(".")[0]).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(state, model)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise AdvpipeError(f"{source} does not fit {arch}: the weight conversion of timm failed "
                           f"({type(exc).__name__}: {str(exc)[:120]})", fields=("pretrained", "model")) from exc


def _under(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _is_registered(arch: str) -> bool:
    from advpipe.models.registry import MODELS  # the registry imports this layer's siblings; import late

    return arch in MODELS
