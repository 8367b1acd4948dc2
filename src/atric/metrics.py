"""Retrieval metrics from a [captions_per_clip * N, N] similarity matrix (the original's protocol).

Caption row i belongs to clip i // captions_per_clip. Ranks are 0-based positions in
ascending distance (distance = -similarity); tied values share the average of their
positions, i.e. rank(v) = #(values > v) + (#(values == v) - 1) / 2, the same as
``scipy.stats.rankdata(-x, method="average") - 1``.

- t2a: rank of the caption's own clip among the N clips of its row.
- a2t: rank of a clip = the lowest rank of its captions among all captions of its column.
- R@1 counts rank == 0 exactly (a tie-averaged 0.5 is not a hit); R@k counts rank < k.
  A consequence of the protocol, kept as is: if all captions of a clip score exactly
  the same (e.g. identical captions), they share positions 0..cpc-1 and the clip's a2t
  rank is (cpc - 1) / 2, so it is not an R@1 hit.
- mAP@10: t2a has one relevant clip, so AP = 1 / (rank + 1) if rank < 10 else 0. a2t has
  captions_per_clip relevant captions: with their ranks sorted, r_1 <= r_2 <= ...,
  AP@10 = (1 / min(10, n_relevant)) * sum over m with r_m < 10 of m / (r_m + 1)
  (precision at each relevant hit within the top 10, the DCASE definition), using the
  same tie-averaged ranks.

Ranks need no sort: they are counts of the scores above and equal to the ground-truth
value. The matrix is walked in blocks of rows that stay in the CPU cache while every
comparison of the block runs (one pass over memory instead of one per target), the blocks
spread over the available cores (numpy releases the GIL); 5,000 x 1,000 takes milliseconds.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from atric.errors import DataError

RECALL_KS: tuple[int, ...] = (1, 5, 10, 50)
MAP_CUTOFF = 10
DIRECTIONS: tuple[str, ...] = ("t2a", "a2t")


# Rows of the similarity matrix per block: 255 x 1,000 float32 is 1 MiB, cache-sized, and a
# column's count over one block fits one byte (see _column_counts).
BLOCK_ROWS = 255
LANES = 8  # bool bytes per uint64 word


def _mask_buffer(masks: int, rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An uninitialised [masks, rows, width] bool buffer padded to whole uint64 words (the padding
    False), and the unpadded view that comparisons write into."""
    buffer = np.empty((masks, rows, -(-width // LANES) * LANES), dtype=bool)
    buffer[:, :, width:] = False
    return buffer, buffer[:, :, :width]


def _column_counts(buffer: np.ndarray) -> np.ndarray:
    """``buffer.sum(axis=1)`` for [masks, <= 255 rows, 8k] bools, [masks, 8k] uint8: the rows are
    added as uint64 words, whose 8 byte lanes each sum one column and cannot carry into the next
    (at most 255 ones)."""
    words = np.add.reduce(buffer.view(np.uint64), axis=1)
    return words.view(np.uint8).reshape(buffer.shape[0], -1)


def _row_counts(buffer: np.ndarray) -> np.ndarray:
    """``buffer.sum(axis=2)`` for [masks, rows, 8k] bools, as int64: each row's words added 255 at
    a time as packed byte lanes (exact, as above), then the 8 lanes."""
    words = buffer.view(np.uint64)
    total = np.zeros(buffer.shape[:2], dtype=np.int64)
    for first in range(0, words.shape[2], 255):
        lanes = np.add.reduce(words[:, :, first : first + 255], axis=2)
        total += lanes.view(np.uint8).reshape(*buffer.shape[:2], LANES).sum(axis=2, dtype=np.int64)
    return total


# numpy compares a block against a row of thresholds row by row; rows of at least this many
# values run about twice as fast as 1,000-value rows, so narrow matrices are compared with
# several rows laid side by side (the thresholds repeated to match).
WIDE_ROW = 4096


def _side_by_side(columns: int) -> int:
    """How many matrix rows one wide row holds (at most a block's rows)."""
    return max(1, min(BLOCK_ROWS, -(-WIDE_ROW // columns)))


def _block_counts(
    sim: np.ndarray, own: np.ndarray, gt_wide: np.ndarray, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """For rows [start, stop): per row, the scores > and >= its own clip's (t2a); per caption slot
    and clip column, the block's scores > and >= that slot's ground truth (a2t, partial sums);
    whether the block's values are all finite.

    The comparisons of a block write into one bool buffer, counted by one reduction, with the
    counts as word-wide additions, 8 columns at a time."""
    block = sim[start:stop]
    rows, columns = block.shape
    with np.errstate(over="ignore"):  # a sum overflowing from huge finite values: the exact check
        finite = bool(np.isfinite(block.sum())) or bool(np.isfinite(block).all())
    target = own[start:stop, None]
    buffer, masks = _mask_buffer(2, rows, columns)
    np.greater(block, target, out=masks[0])
    np.greater_equal(block, target, out=masks[1])
    row_above, row_at_least = _row_counts(buffer)

    side = gt_wide.shape[1] // columns
    if rows % side:  # the last, short block: one matrix row per row
        side, thresholds = 1, gt_wide[:, :columns]
    else:
        thresholds = gt_wide
    wide = block.reshape(rows // side, side * columns)
    buffer, masks = _mask_buffer(2, rows // side, side * columns)
    counts = np.empty((2 * len(thresholds), buffer.shape[2]), dtype=np.uint8)
    for slot, values in enumerate(thresholds):
        np.greater(wide, values, out=masks[0])
        np.greater_equal(wide, values, out=masks[1])
        counts[2 * slot : 2 * slot + 2] = _column_counts(buffer)
    counts = counts[:, : side * columns]
    counts = counts.reshape(len(counts), side, columns).sum(axis=1, dtype=np.int64)  # side by side rows added
    return row_above, row_at_least, counts[0::2], counts[1::2], finite


def _tie_averaged(above: np.ndarray, at_least: np.ndarray) -> np.ndarray:
    """rank = #(values > v) + (#(values == v) - 1) / 2, the target itself among the equal ones."""
    return above + (at_least - above - 1) / 2.0


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """Threads kept for the process (evaluation calls this every epoch, and starting them costs
    about as much as counting a small matrix); keyed by pid, as a forked child has none of them."""
    return ThreadPoolExecutor(workers, thread_name_prefix="atric-metrics")


def _ranks(sim: np.ndarray, own: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """t2a ranks [cpc * N] and a2t slot ranks [cpc, N], tie-averaged, by blocked counting."""
    from atric.device import available_cpus

    side = _side_by_side(sim.shape[1])
    gt_wide = np.tile(gt, (1, side))
    block_rows = side * (BLOCK_ROWS // side)  # whole wide rows in every block but the last
    bounds = [(start, min(start + block_rows, sim.shape[0])) for start in range(0, sim.shape[0], block_rows)]
    workers = min(available_cpus(), len(bounds))
    if workers > 1:
        parts = list(_pool(workers, os.getpid()).map(lambda b: _block_counts(sim, own, gt_wide, *b), bounds))
    else:
        parts = [_block_counts(sim, own, gt_wide, *b) for b in bounds]
    if not all(p[4] for p in parts):
        raise DataError(f"similarity matrix holds {int(np.size(sim) - np.isfinite(sim).sum())} NaN/inf values")
    t2a = _tie_averaged(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    a2t = _tie_averaged(sum(p[2] for p in parts), sum(p[3] for p in parts))
    return t2a, a2t


def _summary(ranks: np.ndarray, average_precision: np.ndarray, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in RECALL_KS:
        # R@1 needs rank exactly 0: a tie-averaged 0.5 (a shared first place) is not a hit.
        hits = ranks == 0 if k == 1 else ranks < k
        out[f"{prefix}_R{k}"] = float(100.0 * np.mean(hits))
    out[f"{prefix}_MedR"] = float(np.median(ranks) + 1)
    out[f"{prefix}_MeanR"] = float(np.mean(ranks) + 1)
    out[f"{prefix}_mAP10"] = float(np.mean(average_precision))
    out[f"{prefix}_geometric_mean"] = float(
        np.cbrt(out[f"{prefix}_R1"] * out[f"{prefix}_R5"] * out[f"{prefix}_R10"])
    )
    return out


def retrieval_metrics(sim: np.ndarray, captions_per_clip: int = 5) -> dict[str, float]:
    """t2a_* and a2t_* R1/R5/R10/R50/MedR/MeanR/mAP10/geometric_mean for a [cpc*N, N] matrix."""
    if not isinstance(captions_per_clip, (int, np.integer)) or captions_per_clip < 1:
        raise DataError(f"captions_per_clip must be a positive integer, got {captions_per_clip!r}")
    sim = np.asarray(sim)
    if sim.ndim != 2:
        raise DataError(f"similarity matrix must be 2-D [captions, clips], got shape {sim.shape}")
    n_captions, n_clips = sim.shape
    if n_clips == 0:
        raise DataError("similarity matrix has no clips (N == 0)")
    if n_captions != captions_per_clip * n_clips:
        raise DataError(
            f"similarity matrix has shape {sim.shape}: expected [{captions_per_clip} * N, N] = "
            f"[{captions_per_clip * n_clips}, {n_clips}] ({captions_per_clip} captions per clip, "
            f"caption row i belonging to clip i // {captions_per_clip})"
        )
    if not np.issubdtype(sim.dtype, np.number) or np.iscomplexobj(sim):
        raise DataError(f"similarity matrix must be real-valued, got dtype {sim.dtype}")
    clip_of_caption = np.arange(n_captions) // captions_per_clip
    # Similarity of every caption to its own clip, arranged [slot, clip]: gt[s, c] = sim[c*cpc + s, c].
    own = sim[np.arange(n_captions), clip_of_caption]
    gt = np.ascontiguousarray(own.reshape(n_clips, captions_per_clip).T)  # rows compared in turn

    # t2a: each caption row against its own clip's value; a2t: each caption slot within its
    # clip's column. NaN/inf are refused there: a block's sum is finite when all its values are
    # (NaN/inf propagate), and only a sum that overflowed needs the exact element check.
    t2a_ranks, slot_ranks = _ranks(sim, own, gt)  # [cpc * N], [cpc, N]
    t2a_ap = np.where(t2a_ranks < MAP_CUTOFF, 1.0 / (t2a_ranks + 1.0), 0.0)
    a2t_ranks = slot_ranks.min(axis=0)
    ordered = np.sort(slot_ranks, axis=0)
    hit_number = np.arange(1, captions_per_clip + 1, dtype=float)[:, None]
    precision = np.where(ordered < MAP_CUTOFF, hit_number / (ordered + 1.0), 0.0)
    a2t_ap = precision.sum(axis=0) / min(MAP_CUTOFF, captions_per_clip)

    return {**_summary(t2a_ranks, t2a_ap, "t2a"), **_summary(a2t_ranks, a2t_ap, "a2t")}


def format_metrics_table(metrics: dict[str, float]) -> str:
    """A small aligned text table: one row per direction present in ``metrics``."""
    columns = [(f"R{k}", f"R@{k}") for k in RECALL_KS] + [
        ("MedR", "MedR"),
        ("MeanR", "MeanR"),
        ("mAP10", "mAP@10"),
        ("geometric_mean", "geo"),
    ]
    header = ["dir"] + [label for _, label in columns]
    rows = []
    for direction in DIRECTIONS:
        if not any(key.startswith(direction + "_") for key in metrics):
            continue
        cells = [direction]
        for key, _ in columns:
            value = metrics.get(f"{direction}_{key}")
            cells.append("-" if value is None else f"{value:.3f}" if key == "mAP10" else f"{value:.2f}")
        rows.append(cells)
    if not rows:
        raise DataError("format_metrics_table: no t2a_* or a2t_* keys in the metrics")
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header] + rows]
    return "\n".join(lines)
