"""Image grids for previews (data, attack masks, augmentations), drawn with matplotlib's Agg backend."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from advpipe.files import check_writable_dir


def to_rgb_array(images: torch.Tensor) -> np.ndarray:
    """Turn (N,C,H,W) floats in [0,1] (or uint8) or (N,H,W) masks into (N,H,W,3) floats for plotting."""
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        images = images.float() / 255
    images = images.float()
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def save_image_grid(rows: Sequence[torch.Tensor], path: str | Path, *, row_titles: Sequence[str] | None = None,
                    col_titles: Sequence[str] | None = None, cell_titles: Sequence[Sequence[str]] | None = None,
                    title: str | None = None, scale: float = 1.1) -> Path:
    """Save a grid whose rows are image batches of equal length (images, masks, ...) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = [to_rgb_array(r) for r in rows]
    n_rows, n_cols = len(arrays), max(len(a) for a in arrays)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(scale * n_cols + (1.2 if row_titles else 0), (scale + (0.2 if cell_titles else 0)) * n_rows + 0.4),
                             squeeze=False)
    for r, arr in enumerate(arrays):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(arr):
                ax.imshow(arr[c], interpolation="nearest")
            if cell_titles and c < len(cell_titles[r]):
                ax.set_title(cell_titles[r][c], fontsize=7)
            elif r == 0 and col_titles and c < len(col_titles):
                ax.set_title(col_titles[c], fontsize=7)
        if row_titles:
            axes[r][0].set_ylabel(row_titles[r], fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    check_writable_dir(path.parent if str(path.parent) else Path("."), "output folder")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
