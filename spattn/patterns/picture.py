"""Pictures of a pattern's mask, like the LongNet paper's figures (matplotlib, imported lazily).

Queries run down, keys across; each branch has its own colour on white, painted in order so that
the sparser later branches show on top of the denser first ones. Only the first `tokens` tokens
are drawn.

A picture is bounded like every other part of `inspect`: the mask is computed a band of rows at
a time (never a whole N x N array), at most MAX_PICTURE_WORK cells over every head drawn, and a
grid holds at most MAX_PICTURE_HEADS heads. Where a picture has fewer pixels than tokens, each
pixel shows the topmost branch any of its cells has, so thin lines do not vanish.
"""

from __future__ import annotations

import math
import os
import stat
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
import torch

from spattn.errors import SpattnError
from spattn.limits import MAX_PICTURE_HEADS, MAX_PICTURE_WORK, check_work
from spattn.patterns.blocks import first_rows
from spattn.patterns.counting import draw_work
from spattn.patterns.geometry import Geometry, RandomBlocks, describe, resolve
from spattn.patterns.spec import Pattern, RandomBranch, RandomSpec

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f")
MAX_TOKENS = 4096
BAND_CELLS = 1 << 20  # mask cells computed at once (int64 temporaries: 8 MB each)

RowMask = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows, keys) -> (R, K) bool


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])


def _palette(branches: int) -> np.ndarray:
    """(branches + 1, 3) RGB floats: white, then each branch's colour."""
    return np.array([(1.0, 1.0, 1.0)] + [_rgb(COLOURS[i % len(COLOURS)])
                                         for i in range(branches)])


def picture_work(branches: int, heads_drawn: int, tokens: int) -> int:
    """Mask cells a picture computes: every branch, on every cell of every head drawn (a random
    branch's draws add theirs: `check_picture`)."""
    return max(1, branches) * heads_drawn * tokens * tokens


def mask_image(pattern: Pattern, seq_len: int, heads: int, head: int, tokens: int) -> np.ndarray:
    """(tokens, tokens, 3) RGB floats: one head's mask over the first `tokens` tokens."""
    n = min(tokens, seq_len)
    geometries = resolve(pattern, seq_len, heads)
    check_work(picture_work(len(geometries), 1, n), f"the mask of the first {n:,} tokens",
               MAX_PICTURE_WORK)
    index = branch_image(geometries, head, seq_len, pattern.causal, n, 1)
    return _palette(len(geometries))[index]


def branch_image(geometries: Sequence[Geometry], head: int, seq_len: int, causal: bool, n: int,
                 pool: int) -> np.ndarray:
    """(side, side) int16, side = ceil(n / pool): per pixel of pool x pool cells, 1 + the last
    branch that allows one of its cells (0: none), over the first n tokens; computed a band of
    rows at a time: beside the image, memory is O(BAND_CELLS), never an n x n mask."""
    side = -(-n // pool)
    image = torch.zeros((side, side), dtype=torch.int16)
    masks = [_row_mask(g, head, seq_len, causal, n) for g in geometries]
    keys = torch.arange(n)
    band = pool * max(1, BAND_CELLS // (n * pool))  # rows at once, whole pixels
    for start in range(0, n, band):
        rows = torch.arange(start, min(start + band, n))
        pixels = -(-len(rows) // pool)
        cells = torch.zeros((pixels * pool, side * pool), dtype=torch.int16)  # zeros past n
        for i, mask in enumerate(masks):
            cells[:len(rows), :n].masked_fill_(mask(rows, keys), i + 1)
        top = start // pool
        image[top:top + pixels] = cells.view(pixels, pool, side, pool).amax(dim=(1, 3))
    return image.numpy()


def _row_mask(g: Geometry, head: int, seq_len: int, causal: bool, n: int) -> RowMask:
    """One branch's mask of some query rows over keys, causal order applied; random blocks are
    drawn for the first n tokens' blocks only."""
    if isinstance(g, RandomBlocks) and g.applies(head):
        allows = _random_mask(g, head, seq_len, causal, n)
    else:
        def allows(rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
            return g.allows(head, rows[:, None], keys[None, :])

    if not causal:
        return allows
    return lambda rows, keys: allows(rows, keys) & (keys[None, :] <= rows[:, None])


def _random_mask(g: RandomBlocks, head: int, seq_len: int, causal: bool, n: int) -> RowMask:
    blocks = -(-n // g.block)
    check_work(draw_work(blocks, max(1, min(g.blocks, -(-seq_len // g.block)))),
               f"drawing random blocks ({g.blocks} per query block) of the first {n:,} tokens",
               MAX_PICTURE_WORK)
    table = first_rows(g.block, g.blocks, g.seed, seq_len, head, causal, blocks)
    seen = np.zeros((blocks, blocks), dtype=bool)  # query block x key block, both in the picture
    row, slot = np.nonzero((table >= 0) & (table < blocks))
    seen[row, table[row, slot]] = True
    drawn = torch.from_numpy(seen)

    def allows(rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return drawn[(rows // g.block)[:, None], (keys // g.block)[None, :]]

    return allows


def check_picture(pattern: Pattern, seq_len: int, heads: int, path: str | os.PathLike[str],
                  head: int | None = 0, tokens: int = 256) -> None:
    """The SpattnError `draw_mask` would raise for these arguments, before any work is done."""
    if not 1 <= tokens <= MAX_TOKENS:
        raise SpattnError(f"--png-tokens: expected an integer in [1, {MAX_TOKENS}], got {tokens}")
    if head is not None and not 0 <= head < heads:
        raise SpattnError(f"--head: expected 'all' or a head in [0, {heads}), got {head}")
    drawn = 1 if head is not None else heads
    if drawn > MAX_PICTURE_HEADS:
        raise SpattnError(f"--head all: {heads:,} heads are more than the {MAX_PICTURE_HEADS} "
                          f"one picture draws; pass --head H")
    n = min(tokens, seq_len)
    branches = pattern.expanded_branches()
    draws = sum(_draw_work(b.random, seq_len, n) for b in branches if isinstance(b, RandomBranch))
    work = picture_work(len(branches), drawn, n) + drawn * draws
    if work > MAX_PICTURE_WORK:
        raise SpattnError(f"--png: {drawn:,} head(s) x {n:,} x {n:,} tokens x {len(branches)} "
                          f"branch(es) is about {work:,} elements of work (mask cells and random "
                          f"draws), past the {MAX_PICTURE_WORK:,} a picture may take; pass a "
                          f"smaller --png-tokens or --head H")
    check_destination(path, "--png")


def _draw_work(spec: RandomSpec, seq_len: int, n: int) -> int:
    """One head's draw of the blocks of the first n tokens (as `first_rows` draws them)."""
    rows = -(-n // spec.block)
    return draw_work(rows, max(1, min(spec.blocks, -(-seq_len // spec.block))))


def check_destination(path: str | os.PathLike[str], flag: str) -> None:
    """A SpattnError unless `path` can be written as a plain file: its folder exists, and it is
    not there yet or is a regular file (never a device, FIFO, socket, folder or symbolic link,
    which replacing would destroy or follow)."""
    shown = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SpattnError(f"{flag}: no such folder: {folder}")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise SpattnError(f"{flag}: cannot write {shown}: {error.strerror}") from None
    if stat.S_ISLNK(mode):
        raise SpattnError(f"{flag}: {shown} is a symbolic link; refusing to replace it (give "
                          f"the path of a regular file)")
    if not stat.S_ISREG(mode):
        raise SpattnError(f"{flag}: {shown} exists and is {_kind(mode)}, not a regular file; "
                          f"refusing to replace it")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def draw_mask(pattern: Pattern, seq_len: int, heads: int, path: str | os.PathLike[str],
              head: int | None = 0, tokens: int = 256, title: str | None = None) -> int:
    """Write a PNG of the mask of `head` (None: every head, in a grid); returns tokens drawn.

    The file is written atomically (a temporary file in the same folder, then a rename), and
    only as a regular file (`check_destination`).
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise SpattnError("--png needs matplotlib: pip install spattn[plot]") from None
    check_picture(pattern, seq_len, heads, path, head, tokens)
    heads_drawn: Sequence[int] = range(heads) if head is None else [head]
    n = min(tokens, seq_len)
    geometries = resolve(pattern, seq_len, heads)
    palette = (255 * _palette(len(geometries))).round().astype(np.uint8)

    cols = math.ceil(math.sqrt(len(heads_drawn)))
    rows = math.ceil(len(heads_drawn) / cols)
    size = 6.0 if cols == 1 else 3.2
    dpi = max(100, min(300, 1.5 * n / size))
    pool = max(1, -(-n // math.ceil(size * dpi)))  # no more pixels than the picture shows
    figure = Figure(figsize=(size * cols, (size + 0.4) * rows + 1.0), layout="constrained")
    for i, h in enumerate(heads_drawn):
        axes = figure.add_subplot(rows, cols, i + 1)
        image = palette[branch_image(geometries, h, seq_len, pattern.causal, n, pool)]
        axes.imshow(image, interpolation="nearest", extent=(-0.5, n - 0.5, n - 0.5, -0.5))
        axes.set_title(f"head {h}", fontsize=10)
        axes.set_xlabel("key")
        axes.set_ylabel("query")
    shown = f"first {n:,} of {seq_len:,} tokens" if n < seq_len else f"{n:,} tokens"
    figure.suptitle(f"{title or pattern.name}: {shown}")
    labels = [describe(g) for g in geometries]
    figure.legend(handles=[Patch(color=COLOURS[i % len(COLOURS)], label=label)
                           for i, label in enumerate(labels)],
                  loc="outside lower center", ncols=min(len(labels), 3), frameon=False)

    try:
        _write_atomically(figure, path, dpi=dpi)
    except OSError as error:
        raise SpattnError(f"--png: cannot write {os.fspath(path)}: {error.strerror}") from None
    return n


def _write_atomically(figure: object, path: str | os.PathLike[str], dpi: float) -> None:
    """savefig into a temporary file beside `path`, then rename it over `path`, checked again
    just before (a FIFO or device made meanwhile is refused, not replaced)."""
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=".spattn-", suffix=".png")
    try:
        with os.fdopen(descriptor, "wb") as file:
            figure.savefig(file, format="png", dpi=dpi)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; give the usual mode
        check_destination(path, "--png")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
