"""Run under torchrun by tests/test_distributed.py: train briefly, then record this rank's weights."""

import hashlib
import sys

import torch

from advpipe.train.config import TrainConfig
from advpipe.train.loop import train

out = sys.argv[1]
result = train(TrainConfig(data="embedded", limit=256, model="resnet20", epochs=1, batch_size=32, lr=0.05,
                           out=out, device="cpu", seed=1))
digest = hashlib.sha256()
for key, value in sorted(result.model.state_dict().items()):
    digest.update(key.encode())
    digest.update(value.detach().cpu().contiguous().numpy().tobytes())
rank = __import__("os").environ["RANK"]
with open(f"{out}/rank{rank}.sha256", "w") as fh:
    fh.write(digest.hexdigest())
