# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Files the collection creates: exclusively (never over a planted file, never through a symlink), with modes set
explicitly (the umask cannot cut them), durably (fsync of files and folders), JSON written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import typing as t

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError

_NEW_FILE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_exclusive(path: str, mode: int = 0o600, flags: int = os.O_WRONLY) -> int:
    """A new file at path, open (the fd is returned): O_CREAT|O_EXCL|O_NOFOLLOW, so a file or symlink planted at path
    makes it fail and the link's target is never touched; mode set with fchmod, so the umask cannot cut it."""
    try:
        fd = os.open(path, flags | _NEW_FILE, mode)
    except FileExistsError:
        raise VmsnapError(
            f"{path} exists (a file or symlink that this task did not create); refusing to overwrite or follow it; "
            "nothing was changed.",
            path=path,
        ) from None
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


@contextlib.contextmanager
def claimed(path: str, mode: int = 0o600) -> t.Iterator[str]:
    """Create path with create_exclusive() and yield a name through which a child process (qemu-img create or
    convert, which open their target by name and follow symlinks) writes exactly the file this task created:
    /proc/<pid>/fd/<fd>, bound to the open file, whatever is renamed or planted at path meanwhile. A relative backing
    name given to qemu-img create with it must come with -u and a size: qemu-img would resolve it against /proc."""
    fd = create_exclusive(path, mode)
    try:
        yield f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)


def private_folder(beside: str, suffix: str) -> str:
    """A new folder `.NAME<suffix>` (mode 0700) beside the file beside, for a file that a tool such as qemu-img
    creates by name: nobody else can plant a file or symlink inside it. A leftover of a killed run at that name (a
    folder owned by this user, a file, a symlink) is removed first; a symlink is removed itself, never followed."""
    folder, name = os.path.split(beside)
    path = os.path.join(folder, f".{name}{suffix}")
    remove_private_folder(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise VmsnapError(
            f"{path} exists (it appeared while this task was removing a leftover there); refusing to overwrite or "
            "follow it; nothing was changed.",
            path=path,
        ) from None
    return path


def remove_private_folder(path: str) -> None:
    """Remove what private_folder() made at path (or a killed run left there); anything else there is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if st.st_uid != os.geteuid():
            raise VmsnapError(
                f"{path} exists and belongs to another user (uid {st.st_uid}); refusing to use or remove it; "
                "nothing was changed.",
                path=path,
            )
        shutil.rmtree(path)  # the fd-based rmtree: it never follows a symlink inside
    else:
        os.unlink(path)  # a file or a symlink itself, never its target


def link_new(source: str, final: str) -> None:
    """Give source (a file in a private folder) the name final with link(2), which fails on any file or symlink at
    final and never follows it; then drop the source name. The caller fsyncs final's folder."""
    try:
        os.link(source, final, follow_symlinks=False)
    except FileExistsError:
        raise VmsnapError(
            f"{final} exists (a file or symlink appeared there after this task checked); refusing to overwrite or "
            "follow it; nothing was changed.",
            path=final,
        ) from None
    with contextlib.suppress(OSError):
        os.unlink(source)  # the private folder is removed anyway


def set_mode(path: str, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Explicit mode (and owner, when running as root) of a file this task created in a private folder."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, owner[0], owner[1])
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def write_json_atomic(path: str, data: t.Any, temp: str) -> None:
    """JSON (indented, sorted keys) written with write_bytes_atomic."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"), temp)


def write_bytes_atomic(path: str, payload: bytes, temp: str) -> None:
    """Write path with mode 0600: temp (in path's folder, named so that the caller's clean-up recognises it)
    created exclusively, fsync, rename over path, fsync the folder."""
    fd = create_exclusive(temp)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_folder(os.path.dirname(path))


def fsync_folder(folder: str) -> None:
    fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
