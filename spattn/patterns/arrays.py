"""Small numpy helpers shared by the analytic counts, tile lists and layouts."""

from __future__ import annotations

import numpy as np


def ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For items with `counts` pieces each, every piece's item and its index within the item:
    counts [2, 0, 3] -> items [0, 0, 2, 2, 2], indices [0, 1, 0, 1, 2]."""
    counts = np.asarray(counts, dtype=np.int64)
    item = np.repeat(np.arange(len(counts)), counts)
    return item, np.arange(len(item), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts,
                                                                  counts)
