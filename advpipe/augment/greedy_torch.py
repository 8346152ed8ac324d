"""The torch backend of AdvMask's greedy square scan: batched rounds over all images (the CUDA default).

A rejected candidate can never become acceptable later, because both the overlap test and the union
``|cover ∪ square|`` only grow as squares are accepted. So the sequential scan equals "repeatedly
accept the first still-acceptable candidate in visiting order", and the batched loop runs once per
*accepted* square (about 7 per image on CIFAR, about 20 for the slowest image of a batch of 256)
instead of once per candidate. Each round updates, for all candidates of all images at once, the
exact pairwise-overlap test against the newly accepted box and a lower bound on the pixels each
candidate would add (its area minus the sum of its overlaps); the exact new pixels of the one chosen
candidate per image are counted on a coverage bitmap (16 columns per int32 word, a 16-bit popcount
table). Finished images leave the working set, so late rounds touch only the few images still growing.

The random draws come from :func:`advpipe.augment.squares.sample_squares`; everything here is
deterministic, and gives exactly what the numba scan (:mod:`advpipe.augment.greedy_numba`) gives.
"""

from __future__ import annotations

import functools

import torch


def _candidates(points: torch.Tensor, counts: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k points of each image in visiting order: (2,B,k) float (row, col) and (B,k) real-slot flags.

    ``points`` is (B,H,W) bool with ``counts`` points per image. The order is a partial Fisher-Yates
    shuffle of the points in raster order: slot j swaps with slot ``j + floor(u[:, j] * (n - j))``,
    a uniformly random subset in uniformly random order, computed exactly as the numba backend does.
    """
    b, k = u.shape
    dev = points.device
    img, rr, cc = points.nonzero().unbind(1)
    width = max(int(counts.max()), k)
    perm = torch.zeros(b, width, dtype=torch.long, device=dev)
    rank = torch.arange(len(img), device=dev) - (counts.cumsum(0) - counts)[img]
    perm[img, rank] = rr * points.shape[2] + cc
    left = counts.float()
    for j in range(k):
        pick = (j + (u[:, j] * (left - j).clamp(min=0)).floor().long()).clamp(max=(counts - 1).clamp(min=j))
        here = perm[:, j].clone()
        perm[:, j] = perm.gather(1, pick[:, None]).squeeze(1)
        perm.scatter_(1, pick[:, None], here[:, None])
    chosen = perm[:, :k]
    centre = torch.stack([chosen // points.shape[2], chosen % points.shape[2]]).float()
    return centre, torch.arange(k, device=dev) < counts[:, None]


@functools.lru_cache(maxsize=None)
def _bit_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-device tables over all 16-bit patterns: popcount (float32, exact) and which of the 16 bits are clear."""
    count = torch.zeros(1, device=device)
    for _ in range(16):
        count = torch.cat([count, count + 1])
    bits = (torch.arange(1 << 16, device=device)[:, None] >> torch.arange(16, device=device)) & 1
    return count, bits == 0


def greedy_rounds(points: torch.Tensor, counts: torch.Tensor, u: torch.Tensor, side: torch.Tensor,
                  target: torch.Tensor, o: torch.Tensor, t_max: int, l_max: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy square acceptance as batched torch rounds on (B,H,W) point masks with (B,K) draws ``u``, ``side``.

    Returns squares (B,A,3), valid (B,A), covered pixel counts (B,), the keep mask (B,H,W) and
    ``counts`` (B,), the number of points per image.

    State per image, kept free of bool tensors in the wide updates because those are the slow
    kernels on CPU: ``need`` (B,K) is a lower bound on the pixels each candidate would add (its area
    minus the sum of its overlaps with accepted squares) plus ``big`` once it is accepted or rejected
    for good; ``slack`` (B,) is the pixel budget left, or -1 once the image reached its target.
    Coverage is a bitmap with 16 columns per int32 word. Each round takes every image's candidate
    with ``need <= slack`` and the lowest slot (slots are in visiting order), counts its exact new pixels on the bitmap
    (a 16-bit popcount table), accepts it if they fit, and updates ``need`` of all candidates against
    the accepted box. Images with nothing left to try leave the working set once at most half of it
    is live, so late rounds are cheap.
    """
    b, h, w = points.shape
    k = u.shape[1]
    dev = points.device
    centre, real = _candidates(points, counts, u)
    # (6,B,K) float planes, integers held exactly: y0, x0, y1, x1, floor(o * area), height. Built
    # plane by plane because CPU kernels on 32k+ elements go multi-threaded, which stalls on busy cores
    feats = torch.empty(6, b, k, device=dev)
    fside, half = side.float(), (side // 2).float()
    for axis, limit in ((0, h), (1, w)):
        start = centre[axis] - half
        torch.clamp(start, min=0, out=feats[axis])
        torch.clamp(start + fside, max=limit, out=feats[2 + axis])
    torch.sub(feats[2], feats[0], out=feats[5])
    area = feats[5] * (feats[3] - feats[1])
    # overlaps are integers, so "inter <= o * area" is exactly "inter <= floor(o * area)"
    torch.floor(o[:, None] * area, out=feats[4])
    y0, x0, y1, x1, o_plane = feats[:5]
    # candidates sit in visiting order, so the slot is the priority: one cheap amin over
    # "slot + k * (does not fit)" finds the next pick (argmin is several times slower on CPU)
    prio = torch.arange(k, device=dev, dtype=torch.float)
    closed = float(k)  # any score at or above this is not a pick
    # the columns of each candidate as bits, 16 per int32 word so a word indexes the popcount table
    n_words = (w + 15) // 16
    col_bits = torch.empty(n_words, b, k, dtype=torch.int32, device=dev)
    x0_int, x1_int = x0.long(), x1.long()
    for j in range(n_words):
        lo_bit, hi_bit = (x0_int - 16 * j).clamp_(0, 16), (x1_int - 16 * j).clamp_(0, 16)
        col_bits[j] = (1 << hi_bit) - (1 << lo_bit)
    big = 4.0 * h * w + 4
    need = area + (~real) * big

    win = min(l_max, h)
    win_rows = torch.arange(win, device=dev)
    # row masks of a window whose first ``height`` rows belong to the square: 0 or -1 (all bits)
    win_mask = -(win_rows[None, :] < torch.arange(win + 1, device=dev)[:, None]).to(torch.int32)
    lut, clear_bits = _bit_tables(dev)
    # ``win`` spare zero rows at the bottom so a window never needs clamping
    cover = torch.zeros(b, h + win, n_words, dtype=torch.int32, device=dev)
    covered = torch.zeros(b, device=dev)
    target = target.float()
    budget = torch.full((b,), float(t_max), device=dev)  # pixels still allowed: t_max - covered
    done = torch.full((b,), -1.0, device=dev)
    slack = torch.where(target > 0, budget, done)  # the budget, or -1 once an image is finished
    rows_of = torch.arange(b, device=dev)  # original row of each working row
    covered_out, cover_out = torch.zeros_like(covered), torch.zeros_like(cover)
    picks_out = torch.full((b, k), -1, dtype=torch.long, device=dev)
    picks = picks_out.clone()
    no_pick = torch.full((b,), -1, dtype=torch.long, device=dev)
    rounds = 0
    for rounds in range(k):
        # open candidates that may still fit score their priority (< closed), all others >= closed;
        # amin rather than min(dim), which starts threads even on tiny inputs (a stall on busy cores)
        best = torch.add(prio, (need - slack[:, None]).clamp_(min=0), alpha=closed).amin(1)
        has = best < closed
        pick = torch.remainder(best, k).long()
        n_live = int(has.sum())
        if n_live == 0:
            break
        if n_live <= len(rows_of) // 2:
            covered_out.index_copy_(0, rows_of, covered)
            cover_out.index_copy_(0, rows_of, cover)
            picks_out.index_copy_(0, rows_of, picks)
            live = has.nonzero().squeeze(1)
            feats, need, col_bits, cover = feats[:, live], need[live], col_bits[:, live], cover[live]
            y0, x0, y1, x1, o_plane = feats[:5]
            covered, target, budget, slack, done = covered[live], target[live], budget[live], slack[live], done[live]
            rows_of, picks, no_pick, pick, has = rows_of[live], picks[live], no_pick[live], pick[live], has[live]
        nb = len(rows_of)
        fy0, fx0, fy1, fx1, fo, fh = feats.gather(2, pick.view(1, nb, 1).expand(6, nb, 1)).unbind(0)  # (B,1) each
        rows_idx = (fy0.long() + win_rows)[:, :, None].expand(nb, win, n_words)
        window = cover.gather(1, rows_idx)
        cols = col_bits.gather(2, pick.view(1, nb, 1).expand(n_words, nb, 1)).permute(1, 2, 0)  # (B,1,words)
        fresh = (cols & win_mask.index_select(0, fh.view(nb).long())[:, :, None]) & ~window
        new = lut.index_select(0, fresh.view(-1)).view(nb, -1).sum(1)
        accept = has & (new <= slack)
        gain = new.mul_(accept)
        need.scatter_(1, pick[:, None], big)
        # overlap of every candidate with the accepted box; an image that accepted nothing gets an
        # empty box (zero height) so its overlaps vanish without a full-width multiply
        fy1 = torch.where(accept[:, None], fy1, fy0)
        inter = (torch.minimum(y1, fy1) - torch.maximum(y0, fy0)).clamp_(min=0)
        inter.mul_((torch.minimum(x1, fx1) - torch.maximum(x0, fx0)).clamp_(min=0))
        conflict = (inter - torch.minimum(o_plane, fo)).clamp_(0, 1)
        need.sub_(inter).add_(conflict, alpha=big)
        cover.scatter_add_(1, rows_idx, fresh.mul_(accept[:, None, None]))
        covered += gain
        budget -= gain
        slack = torch.where(covered >= target, done, budget)
        torch.where(accept, pick, no_pick, out=picks[:, rounds])
    covered_out.index_copy_(0, rows_of, covered)
    cover_out.index_copy_(0, rows_of, cover)
    picks_out.index_copy_(0, rows_of, picks)
    keep = clear_bits.index_select(0, cover_out[:, :h].reshape(-1)).view(b, h, n_words * 16)[:, :, :w]
    return _pack_squares(picks_out[:, : rounds + 1], centre, side, covered_out.long(), keep, counts)


def _pack_squares(picks: torch.Tensor, centre: torch.Tensor, side: torch.Tensor, covered: torch.Tensor,
                  keep: torch.Tensor, counts: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn accepted slots (B,R), -1 where a round accepted nothing, into (squares, valid, covered, keep, counts)."""
    b, dev = picks.shape[0], picks.device
    # rounds where an image accepted nothing leave holes; pack accepted slots to the front, in order
    taken = picks >= 0
    n_taken = taken.sum(1)
    width = int(n_taken.max()) if b else 0
    dest = torch.where(taken, taken.cumsum(1) - 1, width)
    slots = torch.zeros(b, width + 1, dtype=torch.long, device=dev).scatter_(1, dest, picks)
    slots = slots[:, :width]
    valid = torch.arange(width, device=dev) < n_taken[:, None]
    squares = torch.stack([centre[0].long().gather(1, slots), centre[1].long().gather(1, slots),
                           side.gather(1, slots)], -1)
    return squares * valid[..., None], valid, covered, keep, counts
