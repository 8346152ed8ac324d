"""Every attack path's outputs on fixed seeds, to check that a refactor leaves them bit-identical.

Usage (the "before" code imported from another checkout, one process each)::

    cd /tmp && PYTHONPATH=/work/frozen python /work/main/benchmarks/attack_outputs.py save old.pt
    cd /tmp && python /work/main/benchmarks/attack_outputs.py save new.pt
    python /work/main/benchmarks/attack_outputs.py compare old.pt new.pt

``save`` runs FGSM, PGD (random/clean start, CW loss, targeted early stop, continued from a start,
bf16), MI-FGSM, APGD-CE/DLR/T and their worst case, every ``advpipe evaluate`` spec kind, the sparse
attack in six configurations (tensors and summary), ``dense_init``, A-FAN's feature PGD, M-TLAT's
per-sample targeted FGSM and one step (loss and parameter gradients) of PGD-AT, M2AT, AdvProp,
A-FAN, M-TLAT and TLAT on a tiny model. ``compare`` lists every output that is not identical.
"""
import sys
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

import advpipe

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import compare_outputs  # noqa: E402
import advpipe.train  # noqa: F401  (registers the methods)
from advpipe.attacks.apgd import apgd, apgd_targeted, apgd_worst_case
from advpipe.attacks.dense import fgsm, mifgsm, pgd
from advpipe.attacks.init_attack import dense_init
from advpipe.attacks.sparse import SparseAttackConfig, sparse_attack
from advpipe.data.batch import Batch
from advpipe.eval.specs import AttackContext, parse_attack_spec
from advpipe.models.normalize import Normalized
from advpipe.models.registry import create_model
from advpipe.train.afan import feature_pgd
from advpipe.train.methods import MethodContext, build_method
from advpipe.train.mtlat import targeted_fgsm_per_sample

K, S = 10, 16


class Net(nn.Module):
    """A tiny CNN with a BatchNorm (fixed seed)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.fc = nn.Linear(8 * 8 * 8, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.c2(F.relu(self.bn(self.c1(x))))).flatten(1))


def G(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def save(path: str) -> None:
    """Run every attack path and save its outputs to ``path``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out: dict = {}
    model = Net().eval()
    g = G(1)
    x = torch.rand(24, 3, S, S, generator=g)
    x[0, 0, :4] = 0.0
    x[1, 1, :4] = 1.0
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % K
    e = 8 / 255
    out["fgsm"] = fgsm(model, x, y, eps=e)
    out["fgsm_t"] = fgsm(model, x, (y + 1) % K, eps=e, targeted=True)
    out["pgd"] = pgd(model, x, y, eps=e, steps=7, step_size=e / 4, generator=G(2))
    out["pgd_cw"] = pgd(model, x, y, eps=e, steps=7, step_size=e / 4, loss="cw", generator=G(2))
    out["pgd_clean"] = pgd(model, x, y, eps=e, steps=7, step_size=e / 3, random_start=False)
    out["pgd_early"] = pgd(model, x, (y + 2) % K, eps=e, steps=20, step_size=e / 4, targeted=True, early_stop=True,
                           generator=G(3))
    out["pgd_start"] = pgd(model, x, y, eps=e, steps=4, step_size=e / 4, start=out["pgd"])
    out["mifgsm"] = mifgsm(model, x, y, eps=e, steps=6)
    out["mifgsm_rs"] = mifgsm(model, x, y, eps=e, steps=6, random_start=True, decay=0.5, generator=G(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out["pgd_bf16"] = pgd(model, x, y, eps=e, steps=5, step_size=e / 4, generator=G(5))
    out["apgd_ce"] = apgd(model, x, y, eps=e, steps=12, generator=G(6))
    out["apgd_dlr"] = apgd(model, x, y, eps=e, steps=12, loss="dlr", restarts=2, generator=G(6))
    out["apgd_t"] = apgd_targeted(model, x, y, eps=e, steps=12, targets=3, generator=G(7))
    out["apgd_suite"] = apgd_worst_case(model, x, y, eps=e, steps=12, targets=2, generator=G(8))
    for text in ["fgsm", "pgd:steps=5", "cw:steps=5", "pgd-ll:steps=5", "mifgsm-transfer:surrogate=x,steps=5",
                 "apgd-ce:steps=10", "apgd-t:steps=10,targets=2"]:
        spec = parse_attack_spec(text)
        out["spec:" + text] = spec.run(model, x, y, AttackContext(generator=G(9), surrogate=model))
        out["key:" + text] = spec.key
        out["label:" + text] = spec.label
    for name, kw in [("default", {}), ("adaptive", dict(lambda_rule="adaptive", alpha_schedule="linear")),
                     ("targeted", dict(targeted=True, init_attack="pgd")),
                     ("mif", dict(init_attack="mifgsm", keep_best=False)),
                     ("st", dict(straight_through=True, encoder_scope="image")), ("bf16", dict(autocast_dtype="bf16"))]:
        cfg = SparseAttackConfig(eps=Fraction(16, 255), steps=25, **kw)
        res = sparse_attack(model, x, y, cfg, generator=G(10))
        for f in ("mask", "delta", "soft_mask", "success", "l0_elements", "l0_pixels", "l2", "linf", "loss", "l_init",
                  "init_success", "clean_correct", "best_step", "targets"):
            out[f"sparse_{name}_{f}"] = getattr(res, f)
        out[f"sparse_{name}_summary"] = res.summary()
    cfg = SparseAttackConfig(eps=Fraction(8, 255), init_steps=2).resolve((3, S, S))
    out["dense_init"] = dense_init(model, x, y, cfg, G(11))
    head = nn.Sequential(nn.Flatten(), nn.Linear(40, K))
    f = torch.randn(24, 40, generator=G(12))
    out["feature_pgd"] = feature_pgd(head, f, y, eps=torch.tensor(0.05), steps=5, step_size=0.02)
    out["feature_pgd_f"] = feature_pgd(head, f, y, eps=0.2, steps=5, step_size=0.05)
    epsv = torch.linspace(0.0, 0.03, 24)
    out["tfgsm_ps"] = targeted_fgsm_per_sample(model, x, (y + 3) % K, epsv)
    # methods: one step each, losses and grads
    ctx = MethodContext(num_classes=K, epochs=2, image_size=(S, S))
    for name in ["pgd-at", "m2at", "advprop", "afan", "mtlat", "tlat"]:
        net = Normalized(create_model("resnet20", K), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        torch.manual_seed(0)
        for p in net.parameters():
            nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
        opts = {"layer": "layer3"} if name == "afan" else {}
        if name == "afan":
            opts = {}
        m = build_method(name, ctx, **opts)
        net = m.prepare(net)
        net.train()
        batch = Batch(images=x[:16], labels=y[:16], index=torch.arange(16))
        res = m.step(net, batch, G(13))
        out[f"method_{name}_loss"] = res["loss"].detach()
        gr = torch.autograd.grad(res["loss"], [p for p in net.parameters() if p.requires_grad], allow_unused=True)
        out[f"method_{name}_grad"] = torch.cat([q.flatten() for q in gr if q is not None])
    torch.save(out, path)
    print(f"saved {len(out)} outputs of {advpipe.__file__}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["save"]:
        save(sys.argv[2])
    else:
        sys.exit(1 if compare_outputs(sys.argv[2], sys.argv[3]) else 0)
