# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Advisory locks so that two vmsnap tasks never interleave their work on one image or one VM.

The lock is an flock() on a small file in a lock folder, named after the image's (or the QMP socket's) real
path, not on the image itself: QEMU takes its own OFD locks on image files and a later module replaces images
by rename, which would leave a waiter holding a lock on a dead inode. Host-local, like flock() itself.

The folder belongs to the task's user (root: /run/lock/vmsnap.qemu; other users and hosts without /run/lock:
vmsnap.qemu-<uid> under /run/lock or the temp folder), mode 0700; a folder that is a link, or that someone else
owns, is refused, and lock files are opened without following links. The holder writes who it is into the file,
so a waiter that gives up can name it, and unlinks the file before it lets go (waiters then retry on the new file).
Locks are re-entrant within one process: a second hold of the same lock only counts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import stat
import sys
import tempfile
import threading
import time
import typing as t

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import LockTimeoutError, VmsnapError

_POLL_SECONDS = 0.05
_HOLDER_BYTES = 400
_MODULE_PATH = re.compile(r"ansible_collections/([^/]+)/([^/]+)/plugins/modules/([^/]+)\.py$")


class LockFolderError(VmsnapError):
    """The lock folder or a lock file is not safely ours (a link, another user's, not a regular file)."""


def default_lock_dir() -> str:
    """/run/lock/vmsnap.qemu for root; vmsnap.qemu-<uid> under /run/lock (or the temp folder) otherwise."""
    uid = os.geteuid()
    run_lock = os.path.isdir("/run/lock") and os.access("/run/lock", os.W_OK)
    if uid == 0 and run_lock:
        return "/run/lock/vmsnap.qemu"
    return os.path.join("/run/lock" if run_lock else tempfile.gettempdir(), f"vmsnap.qemu-{uid}")


def lock_file_for(image_path: str, lock_dir: str) -> str:
    digest = hashlib.sha256(os.path.realpath(image_path).encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(lock_dir, digest[:32] + ".lock")


def vm_lock_file_for(socket_path: str, lock_dir: str) -> str:
    digest = hashlib.sha256(os.path.realpath(socket_path).encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(lock_dir, "vm-" + digest[:32] + ".lock")


def prepare_lock_dir(directory: str) -> None:
    """Create the folder (0700) or check that it is a folder of this user's, and set its mode to 0700."""
    parent = os.path.dirname(directory)
    try:
        if parent and not os.path.isdir(parent):
            os.makedirs(parent, mode=0o755, exist_ok=True)
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass  # an existing folder is checked below; a file in the way is refused there
    except OSError as exc:
        raise LockFolderError(
            f"The lock folder {directory} cannot be created or opened: {exc.strerror}. Nothing was changed.",
            lock_dir=directory,
        ) from None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise LockFolderError(
                f"The lock folder {directory} is not a plain folder (a symbolic link or a file): refusing to use "
                "it, since whoever made it could redirect the lock files. Nothing was changed; remove it.",
                lock_dir=directory,
            ) from None
        raise LockFolderError(
            f"The lock folder {directory} cannot be created or opened: {exc.strerror}. Nothing was changed.",
            lock_dir=directory,
        ) from None
    try:
        _check_lock_dir(fd, directory)
    finally:
        os.close(fd)


def _check_lock_dir(fd: int, directory: str) -> None:
    info = os.fstat(fd)
    if info.st_uid != os.geteuid():
        raise LockFolderError(
            f"The lock folder {directory} belongs to uid {info.st_uid}, not to this task's user (uid "
            f"{os.geteuid()}): refusing to use it, since its owner could plant links or hold locks there. "
            "Nothing was changed; remove it.",
            lock_dir=directory,
            owner_uid=info.st_uid,
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        try:
            os.fchmod(fd, 0o700)  # the umask cut it, or an older release made it 1777
        except OSError as exc:
            raise LockFolderError(
                f"The lock folder {directory} cannot be made private (mode 0700): {exc.strerror}. Nothing was changed.",
                lock_dir=directory,
            ) from None


def holder_of(lock_path: str) -> str:
    """Who holds a lock, as its holder wrote it ('pid N (module) since ... UTC'); '' when unknown."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        data = os.read(fd, _HOLDER_BYTES)
    except OSError:
        return ""
    finally:
        os.close(fd)
    return "".join(char for char in data.decode("utf-8", "replace") if char.isprintable()).strip()


def task_name() -> str:
    """This process's module as ansible runs it (namespace.collection.module), else its program's name."""
    program = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    match = _MODULE_PATH.search(program.replace(os.sep, "/"))
    return ".".join(match.groups()) if match else os.path.basename(program)


class _Held:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.count = 1


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


def acquire(lock_path: str, timeout: float) -> bool:
    """Take the lock (re-entrant within this process). False when another process still held it after timeout."""
    with _held_guard:
        held = _held.get(lock_path)
        if held is not None:
            held.count += 1
            return True
    deadline = time.monotonic() + timeout
    while True:
        fd = _open_lock_file(lock_path)
        try:
            if not _flock_until(fd, deadline):
                os.close(fd)
                return False
            if _is_current(fd, lock_path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder we waited for unlinked this file; lock the one at the path now
    _write_holder(fd)
    with _held_guard:
        _held[lock_path] = _Held(fd)
    return True


def release(lock_path: str) -> None:
    with _held_guard:
        held = _held.get(lock_path)
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _held[lock_path]
    try:
        if _is_current(held.fd, lock_path):
            with contextlib.suppress(OSError):
                os.unlink(lock_path)  # before unlocking: a waiter that then wins sees the file gone and retries
        fcntl.flock(held.fd, fcntl.LOCK_UN)
    finally:
        os.close(held.fd)


def _open_lock_file(lock_path: str) -> int:
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockFolderError(
                f"The lock file {lock_path} is a symbolic link: refusing to follow it. Nothing was changed; "
                "remove the link.",
                lock_file=lock_path,
            ) from None
        raise LockFolderError(
            f"The lock file {lock_path} cannot be opened: {exc.strerror}. Nothing was changed.", lock_file=lock_path
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise LockFolderError(
                f"The lock file {lock_path} is not a regular file of this task's user (uid {os.geteuid()}; it "
                f"belongs to uid {info.st_uid}): refusing to use it. Nothing was changed; remove it.",
                lock_file=lock_path,
            )
        if stat.S_IMODE(info.st_mode) != 0o600:
            with contextlib.suppress(OSError):  # only cosmetic: the folder is private already
                os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _flock_until(fd: int, deadline: float) -> bool:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_SECONDS)


def _is_current(fd: int, lock_path: str) -> bool:
    try:
        on_disk = os.stat(lock_path, follow_symlinks=False)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


def _write_holder(fd: int) -> None:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    text = f"pid {os.getpid()} ({task_name()}) since {since} UTC\n"
    with contextlib.suppress(OSError):  # naming the holder is a courtesy to waiters; the lock is what counts
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode("utf-8", "replace")[:_HOLDER_BYTES], 0)


def describe_holder(lock_path: str) -> str:
    """'held by pid N (module) since ... UTC', or a note that the holder did not say who it is."""
    holder = holder_of(lock_path)
    return f"held by {holder}" if holder else "the holder did not name itself"


@contextlib.contextmanager
def image_locks(paths: t.Iterable[str], timeout: float, lock_dir: str | None = None) -> t.Iterator[None]:
    """Hold exclusive locks on every image (taken in a fixed order, so two tasks cannot deadlock)."""
    directory = lock_dir or default_lock_dir()
    prepare_lock_dir(directory)
    ordered = sorted({os.path.realpath(path): path for path in paths}.items())
    with contextlib.ExitStack() as stack:
        for dummy, path in ordered:
            stack.enter_context(_locked(path, lock_file_for(path, directory), timeout))
        yield


@contextlib.contextmanager
def _locked(image_path: str, lock_path: str, timeout: float) -> t.Iterator[None]:
    if not acquire(lock_path, timeout):
        raise LockTimeoutError(
            f"Another vmsnap.qemu task is changing {image_path}: its lock ({lock_path}) was still held after "
            f"{timeout:g} s ({describe_holder(lock_path)}). Nothing was changed; retry later or raise lock_timeout.",
            image_path=image_path,
            lock_file=lock_path,
            lock_holder=holder_of(lock_path),
        )
    try:
        yield
    finally:
        release(lock_path)
