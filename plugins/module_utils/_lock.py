# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Per-image advisory locks so that two vmsnap tasks never interleave writes to one image.

The lock is an flock() on a small file in a lock directory, named after the image's real path, not on
the image itself: QEMU takes its own OFD locks on image files and a later module replaces images by
rename, which would leave a waiter holding a lock on a dead inode. Host-local, like flock() itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
import time
import typing as t

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import LockTimeoutError

_POLL_SECONDS = 0.05


def default_lock_dir() -> str:
    base = "/run/lock" if os.path.isdir("/run/lock") and os.access("/run/lock", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, "vmsnap.qemu")


def lock_file_for(image_path: str, lock_dir: str) -> str:
    digest = hashlib.sha256(os.path.realpath(image_path).encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(lock_dir, digest[:32] + ".lock")


@contextlib.contextmanager
def image_locks(paths: t.Iterable[str], timeout: float, lock_dir: str | None = None) -> t.Iterator[None]:
    """Hold exclusive locks on every image (taken in a fixed order, so two tasks cannot deadlock)."""
    directory = lock_dir or default_lock_dir()
    os.makedirs(directory, mode=0o1777, exist_ok=True)
    ordered = sorted({os.path.realpath(path): path for path in paths}.items())
    with contextlib.ExitStack() as stack:
        for dummy, path in ordered:
            stack.enter_context(_locked(path, lock_file_for(path, directory), timeout))
        yield


@contextlib.contextmanager
def _locked(image_path: str, lock_path: str, timeout: float) -> t.Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"Another vmsnap.qemu task is changing {image_path}: its lock ({lock_path}) was still held "
                    f"after {timeout:g} s. Nothing was changed; retry later or raise lock_timeout.",
                    image_path=image_path,
                    lock_file=lock_path,
                )
            time.sleep(_POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
