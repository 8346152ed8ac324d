"""Every augmentation path's outputs on fixed seeds, to check that a refactor leaves them bit-identical.

Usage (the "before" code imported from another checkout, one process each)::

    cd /tmp && PYTHONPATH=/tmp/old python /work/main/benchmarks/augment_outputs.py save old.pt
    cd /tmp && python /work/main/benchmarks/augment_outputs.py save new.pt
    python /work/main/benchmarks/augment_outputs.py compare old.pt new.pt

``save`` runs the kernels (``sample_squares`` on both backends with every fallback, the Cutout,
Random Erasing, Hide-and-Seek and GridMask samplers and keep-masks, RP's and CP's point sources),
every registered ``--aug`` augmentation as the training loop calls it (several option sets, four
epochs of the schedule, three batches per epoch from one generator, plus ``epoch_metrics``), and the
public objects (``advpipe.AdvMask`` with masks by index or per call, RP, CP, ``Cutout``,
``RandomErasing``, ``HideAndSeek``, ``GridMask``, ``create_augmentation("aapm")``, with and without
an explicit generator). It works with the batch-style interface (``aug(batch, generator)``) and the
tensor-style one (``aug(images, side=..., generator=...)``). ``compare`` lists every output that
is not identical.
"""
import inspect
import sys

import torch

import advpipe

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import compare_outputs  # noqa: E402
import advpipe.augment  # noqa: F401  (registers every augmentation)
from advpipe.augment import occlusion
from advpipe.augment.base import AUGMENTS, AugmentContext, InputAugment, build_augment
from advpipe.augment.points import harris_points, random_points
from advpipe.augment.squares import sample_squares

B, S = 24, 32
MEAN = (0.4914, 0.4822, 0.4465)
#: the old interface took a training Batch; the new one takes tensors
BATCH_STYLE = "batch" in inspect.signature(InputAugment.__call__).parameters
#: option sets per registered name, beyond the defaults
OPTIONS = {
    "advmask": [{}, {"fallback": "skip"}, {"fallback": "gridmask"}, {"max_candidates": 8, "l": (3, 9), "o": 0.3},
                {"warmup_epochs": 2, "prob_max": 1.0}],
    "advmask-rp": [{}, {"num_points": 20}],
    "advmask-cp": [{}, {"num_points": 30, "fallback": "gridmask"}],
    "aapm": [{}, {"prob_max": 0.5}],
    "cutout": [{}, {"size": 9}],
    "random-erasing": [{}, {"fill": "mean"}, {"prob": 1.0, "area": (0.1, 0.2), "attempts": 3}],
    "hide-and-seek": [{}, {"grid_sizes": (0, 3, 8), "hide_prob": 0.3}],
    "gridmask": [{}, {"rotate": 45, "warmup_epochs": 2}, {"d": (4, 9), "ratio": 0.5, "prob": 1.0}],
}


def G(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed images and attack masks: dense, sparse (fallbacks), empty (no points) and full rows."""
    g = G(0)
    images = torch.rand(B, 3, S, S, generator=g)
    masks = torch.rand(B, S, S, generator=g) < 0.08
    masks[1] = torch.rand(S, S, generator=g) < 0.004  # a few points: usually short of p_min
    masks[2] = False  # no point at all
    masks[3] = True
    masks[4, 10:14, 10:14] = True
    images[5] = images[5, :, :1, :1]  # a flat image: no corners
    return images, masks


def call(aug: InputAugment, images: torch.Tensor, side: dict, g: torch.Generator) -> torch.Tensor:
    """One training-loop call of a registered augmentation, in whichever interface this code has."""
    if BATCH_STYLE:
        from advpipe.data.batch import Batch

        batch = Batch(images, torch.zeros(len(images), dtype=torch.long), torch.arange(len(images)), side)
        return aug(batch, g).images
    return aug(images, side=side, generator=g)


def kernels(out: dict, images: torch.Tensor, masks: torch.Tensor) -> None:
    """The parameter samplers and their pure functions."""
    for backend in ("numba", "torch"):
        for fallback in ("random", "skip", "gridmask"):
            for i, (l, p, o) in enumerate([((2, 15), (0.2, 0.4), 0.1), ((5, 20), (0.06, 0.5), 0.2)]):
                sq = sample_squares(masks, l, p, o, G(1 + i), fallback, backend=backend)
                for f in ("keep", "squares", "valid", "fallback_used", "p", "o"):
                    out[f"squares/{backend}/{fallback}/{i}/{f}"] = getattr(sq, f)
    out["squares/k8"] = sample_squares(masks, (2, 15), (0.2, 0.4), 0.1, G(2), max_candidates=8).keep
    cut = occlusion.sample_cutout(B, S, S, 16, generator=G(3))
    out["cutout/boxes"] = cut["boxes"]
    out["cutout/keep"] = occlusion.boxes_keep(cut["boxes"], S, S)
    size = (B, 3, S, S) if "channels" in inspect.signature(occlusion.sample_random_erasing).parameters else (B, S, S)
    er = occlusion.sample_random_erasing(*size, generator=G(4))
    out["erasing/boxes"], out["erasing/erase"] = er["boxes"], er["erase"]
    hs = occlusion.sample_hide_and_seek(B, S, S, generator=G(5))
    out["hide/size"], out["hide/hidden"] = hs["size"], hs["hidden"]
    out["hide/keep"] = occlusion.hide_and_seek_keep(hs, S, S)
    gm = occlusion.sample_gridmask(B, S, S, **occlusion.gridmask_defaults(S, S), prob=0.7, generator=G(6))
    for f in ("d", "offset", "angle", "use", "ratio"):
        out[f"gridmask/{f}"] = gm[f]
    out["gridmask/keep"] = occlusion.gridmask_keep(gm, S, S)
    out["points/random"] = random_points(B, S, S, 50, generator=G(7))
    out["points/harris"] = harris_points(images, 40)


def registered(out: dict, images: torch.Tensor, masks: torch.Tensor) -> None:
    """Every registered augmentation as ``advpipe train`` builds and calls it, over a 4-epoch schedule."""
    corners = harris_points((images * 255).round() / 255, 100)
    side = {"attack_mask": masks, "corner_mask": corners}
    for name in AUGMENTS.names():
        for j, options in enumerate(OPTIONS.get(name, [{}])):
            aug = build_augment(name, AugmentContext("cifar10", (S, S), 10, MEAN, epochs=4), **options)
            g = G(10 + j)
            for epoch in range(4):
                aug.set_epoch(epoch, 4)
                for step in range(3):
                    out[f"aug/{name}/{j}/e{epoch}/s{step}"] = call(aug, images, side, g)
                out[f"aug/{name}/{j}/e{epoch}/metrics"] = aug.epoch_metrics()
    # CP without loader corners: found on the batch's images as they are
    aug = build_augment("advmask-cp", AugmentContext("cifar10", (S, S), 10, MEAN, epochs=1))
    out["aug/advmask-cp/no-side"] = call(aug, images, {}, G(20))
    # another dataset's defaults, another image size
    aug = build_augment("advmask", AugmentContext("cifar100", (S, S), 100, MEAN, epochs=1))
    out["aug/advmask/cifar100"] = call(aug, images, side, G(21))
    small = torch.nn.functional.interpolate(images, size=(20, 24))
    for name in ("cutout", "hide-and-seek", "gridmask", "random-erasing", "advmask-rp"):
        aug = build_augment(name, AugmentContext("imagenet", (20, 24), 1000, MEAN, epochs=1))
        out[f"aug/{name}/20x24"] = call(aug, small, {}, G(22))
    out["aug/cutout/float64"] = call(build_augment("cutout", AugmentContext("cifar10", (S, S), 10, MEAN)),
                                     images.double(), {}, G(23))


def public(out: dict, images: torch.Tensor, masks: torch.Tensor) -> None:
    """The public objects of ``import advpipe``."""
    table = torch.cat([masks, masks.flip(0)])  # (N,H,W): dataset masks by index
    index = torch.arange(2 * B - 1, B - 2, -1)[:B] % (2 * B)
    for label, aug in [("advmask", advpipe.AdvMask(table, prob_max=0.8)),
                       ("advmask-cifar100", advpipe.AdvMask(table, dataset="cifar100", mean=0.5)),
                       ("aapm", advpipe.create_augmentation("aapm", masks=table))]:
        for epoch in range(3):
            aug.set_epoch(epoch, 3)
            out[f"api/{label}/e{epoch}"] = aug(images, index, generator=G(30 + epoch))
            out[f"api/{label}/e{epoch}/own"] = aug(images, index)  # the object's own generator
            out[f"api/{label}/e{epoch}/metrics"] = aug.epoch_metrics()
    aug = advpipe.AdvMask(l=(3, 9), p=(0.1, 0.3), o=0.2, prob_max=1.0)
    out["api/advmask/per-call"] = aug(images, attack_masks=masks, generator=G(33))
    out["api/rp"] = advpipe.AdvMask(points="random", num_points=40, prob_max=1.0)(images, generator=G(34))
    out["api/cp"] = advpipe.AdvMask(points="corner", prob_max=1.0, seed=3)(images)
    for cls in (advpipe.Cutout, advpipe.RandomErasing, advpipe.HideAndSeek, advpipe.GridMask):
        aug = cls(mean=MEAN, seed=5)
        out[f"api/{cls.__name__}"] = aug(images, generator=G(35))
        out[f"api/{cls.__name__}/own"] = torch.stack([aug(images), aug(images)])
    out["api/create/cutout"] = advpipe.create_augmentation("cutout", size=8, image_size=S)(images, generator=G(36))


def save(path: str) -> None:
    """Run every augmentation path and save its outputs to ``path``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images, masks = inputs()
    out: dict = {}
    kernels(out, images, masks)
    registered(out, images, masks)
    public(out, images, masks)
    torch.save(out, path)
    print(f"saved {len(out)} outputs of {advpipe.__file__} ({'batch' if BATCH_STYLE else 'tensor'} interface)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["save"]:
        save(sys.argv[2])
    else:
        sys.exit(1 if compare_outputs(sys.argv[2], sys.argv[3]) else 0)
