"""Every file the CLI writes is a regular file, written whole: a destination that exists and is
not a regular file (a FIFO, a folder, a symbolic link, a device) is refused in one line and left
as it was; a regular file is replaced atomically."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from spattn.cli.main import main
from spattn.errors import SpattnError
from spattn.patterns.loader import load_pattern
from spattn.patterns.picture import draw_mask

pytest.importorskip("matplotlib")

# every option of the CLI that writes a file, as a command line given the destination
WRITERS: dict[str, Callable[[str], list[str]]] = {
    "inspect --png (one head)": lambda path: [
        "inspect", "longnet-lm", "-n", "64", "--scale", "64", "--no-hops", "--png", path,
        "--png-tokens", "32"],
    "inspect --png (every head)": lambda path: [
        "inspect", "longnet-lm", "-n", "64", "--scale", "64", "--heads", "2", "--head", "all",
        "--no-hops", "--no-tiles", "--png", path, "--png-tokens", "16"],
}


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _folder(path: Path) -> None:
    path.mkdir()


def _link_to_file(path: Path) -> None:
    (path.parent / "target.png").write_bytes(b"keep me")
    path.symlink_to(path.parent / "target.png")


def _dangling_link(path: Path) -> None:
    path.symlink_to(path.parent / "nowhere.png")


def _socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays


def _char_device(path: Path) -> None:
    """A node like /dev/null's (1, 3), made here: the real one is never touched."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, AttributeError):
        pytest.skip("making a device node needs root")


SPECIAL: dict[str, tuple[Callable[[Path], None], Callable[[int], bool]]] = {
    "fifo": (_fifo, stat.S_ISFIFO),
    "character device": (_char_device, stat.S_ISCHR),
    "folder": (_folder, stat.S_ISDIR),
    "link to a file": (_link_to_file, stat.S_ISLNK),
    "dangling link": (_dangling_link, stat.S_ISLNK),
    "socket": (_socket, stat.S_ISSOCK),
}


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


@pytest.mark.parametrize("kind", list(SPECIAL))
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_special_destination_is_refused_and_kept(writer: str, kind: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    make, is_kind = SPECIAL[kind]
    path = tmp_path / "out.png"
    make(path)
    before = sorted(os.listdir(tmp_path))
    assert _run(WRITERS[writer](str(path))) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith("spattn: error: --png: ") and str(path) in captured.err
    assert captured.out == ""  # refused before the report
    assert is_kind(os.lstat(path).st_mode)  # still the same kind of file
    assert sorted(os.listdir(tmp_path)) == before  # nothing written beside it, no temporary file
    if kind == "link to a file":
        assert (tmp_path / "target.png").read_bytes() == b"keep me"  # nothing written through it


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_regular_destination_is_replaced_whole(writer: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "out.png"
    path.write_bytes(b"old")
    inode = path.stat().st_ino
    assert _run(WRITERS[writer](str(path))) == 0
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_ino != inode  # renamed
    assert os.listdir(tmp_path) == ["out.png"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_draw_mask_refuses_a_fifo_made_while_it_draws(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination is checked again just before the rename."""
    from spattn.patterns import picture

    path = tmp_path / "out.png"
    real = picture._write_atomically

    def fifo_appears(figure: object, where: object, dpi: float) -> None:
        os.mkfifo(path)
        real(figure, where, dpi)

    monkeypatch.setattr(picture, "_write_atomically", fifo_appears)
    with pytest.raises(SpattnError, match="FIFO"):
        draw_mask(load_pattern("longvit"), 32, 2, path, tokens=16)
    assert stat.S_ISFIFO(os.lstat(path).st_mode) and os.listdir(tmp_path) == ["out.png"]
