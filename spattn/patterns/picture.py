"""Pictures of a pattern's mask, like the LongNet paper's figures (matplotlib, imported lazily).

Queries run down, keys across; each branch has its own colour on white, painted in order so that
the sparser later branches show on top of the denser first ones. Only the first `tokens` tokens
are drawn.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence

import numpy as np

from spattn.errors import SpattnError
from spattn.limits import check_work
from spattn.patterns.blocks import first_rows
from spattn.patterns.counting import branch_mask
from spattn.patterns.geometry import Geometry, RandomBlocks, describe, resolve
from spattn.patterns.spec import Pattern

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f")
MAX_TOKENS = 4096


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])


def mask_image(pattern: Pattern, seq_len: int, heads: int, head: int, tokens: int) -> np.ndarray:
    """(tokens, tokens, 3) RGB floats: one head's mask over the first `tokens` tokens."""
    n = min(tokens, seq_len)
    image = np.ones((n, n, 3))
    for i, g in enumerate(resolve(pattern, seq_len, heads)):
        image[_mask(g, head, seq_len, pattern.causal, n)] = _rgb(COLOURS[i % len(COLOURS)])
    return image


def _mask(g: Geometry, head: int, seq_len: int, causal: bool, n: int) -> np.ndarray:
    """One branch's mask over the first n tokens; random blocks drawn for those rows only."""
    if not isinstance(g, RandomBlocks):
        return branch_mask(g, head, seq_len, causal, tokens=n).numpy()
    rows = -(-n // g.block)
    check_work(rows * min(g.blocks, -(-seq_len // g.block)),
               f"drawing random blocks ({g.blocks} per query block) of the first {n:,} tokens")
    table = first_rows(g.block, g.blocks, g.seed, seq_len, head, causal, rows)
    seen = np.zeros((rows, rows), dtype=bool)  # query block x key block, both within the picture
    row, slot = np.nonzero((table >= 0) & (table < rows))
    seen[row, table[row, slot]] = True
    pos = np.arange(n) // g.block
    mask = seen[pos[:, None], pos[None, :]]
    return np.tril(mask) if causal else mask


def draw_mask(pattern: Pattern, seq_len: int, heads: int, path: str | os.PathLike[str],
              head: int | None = 0, tokens: int = 256, title: str | None = None) -> int:
    """Write a PNG of the mask of `head` (None: every head, in a grid); returns tokens drawn.

    The file is written atomically (a temporary file in the same folder, then a rename).
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise SpattnError("--png needs matplotlib: pip install spattn[plot]") from None
    if not 1 <= tokens <= MAX_TOKENS:
        raise SpattnError(f"--png-tokens: expected an integer in [1, {MAX_TOKENS}], got {tokens}")
    heads_drawn: Sequence[int] = range(heads) if head is None else [head]
    if any(not 0 <= h < heads for h in heads_drawn):
        raise SpattnError(f"--head: expected 'all' or a head in [0, {heads}), got {head}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SpattnError(f"--png: no such folder: {folder}")
    n = min(tokens, seq_len)

    cols = math.ceil(math.sqrt(len(heads_drawn)))
    rows = math.ceil(len(heads_drawn) / cols)
    size = 6.0 if cols == 1 else 3.2
    figure = Figure(figsize=(size * cols, (size + 0.4) * rows + 1.0), layout="constrained")
    for i, h in enumerate(heads_drawn):
        axes = figure.add_subplot(rows, cols, i + 1)
        axes.imshow(mask_image(pattern, seq_len, heads, h, n), interpolation="nearest",
                    extent=(-0.5, n - 0.5, n - 0.5, -0.5))
        axes.set_title(f"head {h}", fontsize=10)
        axes.set_xlabel("key")
        axes.set_ylabel("query")
    shown = f"first {n:,} of {seq_len:,} tokens" if n < seq_len else f"{n:,} tokens"
    figure.suptitle(f"{title or pattern.name}: {shown}")
    labels = [describe(g) for g in resolve(pattern, seq_len, heads)]
    figure.legend(handles=[Patch(color=COLOURS[i % len(COLOURS)], label=label)
                           for i, label in enumerate(labels)],
                  loc="outside lower center", ncols=min(len(labels), 3), frameon=False)

    try:
        _write_atomically(figure, path, dpi=max(100, min(300, 1.5 * n / size)))
    except OSError as error:
        raise SpattnError(f"--png: cannot write {os.fspath(path)}: {error.strerror}") from None
    return n


def _write_atomically(figure: object, path: str | os.PathLike[str], dpi: float) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=".spattn-", suffix=".png")
    try:
        with os.fdopen(descriptor, "wb") as file:
            figure.savefig(file, format="png", dpi=dpi)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; give the usual mode
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
