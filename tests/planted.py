"""Planting what spattn must not trust in place of its files (links, FIFOs, devices, folders),
and a guard for calls that could hang on them."""

from __future__ import annotations

import os
import stat
import threading

import pytest

KINDS = ["dangling-link", "link-to-file", "fifo", "char-device", "folder"]


def plant(path, kind, outside, text="keep"):
    """Put a `kind` in place of `path` (a link points into the folder `outside`, to a file of
    `text` or to nothing); returns a check that it was left alone."""
    outside.mkdir(exist_ok=True)
    target = outside / "target"
    if kind == "dangling-link":
        path.symlink_to(target)
    elif kind == "link-to-file":
        target.write_text(text)
        path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "char-device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
        except PermissionError:
            pytest.skip("cannot make a device node here")
    else:
        path.mkdir()
    mode = os.lstat(path).st_mode

    def untouched():
        assert os.lstat(path).st_mode == mode
        if kind == "dangling-link":
            assert not os.path.lexists(target)
        if kind == "link-to-file":
            assert target.read_text() == text
    return untouched


def finishes(fn, timeout=60.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it is not done in time."""
    box = {}

    def call():
        try:
            box["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            box["error"] = error
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")
