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


def remove_private_folder(path: str) -> None:
    """Remove what PrivateFolder made at path (or a killed run left there); anything else there is refused."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)  # a file or a symlink itself, never its target
            return
    except FileNotFoundError:
        return
    except OSError as exc:
        raise VmsnapError(f"Cannot remove {path}: {exc.strerror or exc}; nothing was changed.", path=path) from None
    if st.st_uid != os.geteuid():
        raise VmsnapError(
            f"{path} exists and belongs to another user (uid {st.st_uid}); refusing to use or remove it; "
            "nothing was changed.",
            path=path,
        )
    try:
        shutil.rmtree(path)  # the fd-based rmtree: it never follows a symlink inside
    except OSError as exc:
        raise VmsnapError(f"Cannot remove {path}: {exc.strerror or exc}; nothing was changed.", path=path) from None


class PrivateFolder:
    """A new folder `.NAME<suffix>` (mode 0700) beside a file, for a file that qemu-img writes: held open, so every
    name inside it is reached through the folder's fd (renaming the folder away and planting another one at its
    name changes nothing), and qemu-img writes through /proc/<pid>/fd/<n> of a file created in it. A leftover of a
    killed run at that name is removed first; a symlink there is removed itself, never followed."""

    def __init__(self, beside: str, suffix: str) -> None:
        folder, name = os.path.split(beside)
        self.path = os.path.join(folder, f".{name}{suffix}")
        remove_private_folder(self.path)
        try:
            os.mkdir(self.path, 0o700)
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileExistsError:
            raise VmsnapError(
                f"{self.path} exists (it appeared while this task was removing a leftover there); refusing to "
                "overwrite or follow it; nothing was changed.",
                path=self.path,
            ) from None
        except OSError as exc:
            raise VmsnapError(
                f"Cannot create the private folder {self.path}: {exc.strerror or exc}; nothing was changed.",
                path=self.path,
            ) from None
        st = os.fstat(self.fd)
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700:
            os.close(self.fd)
            raise VmsnapError(
                f"{self.path} was replaced by someone else right after this task made it; refusing to use it; "
                "nothing was changed.",
                path=self.path,
            )
        self.names: list[str] = []
        self.files: list[int] = []

    def __enter__(self) -> PrivateFolder:
        return self

    def __exit__(self, *exc_info: t.Any) -> None:
        self.close()

    def create(self, name: str, mode: int = 0o600) -> str:
        """A new file in the folder, open until close(); returns the name that reaches exactly that file."""
        fd = os.open(name, os.O_RDWR | _NEW_FILE, mode, dir_fd=self.fd)
        self.names.append(name)
        self.files.append(fd)
        os.fchmod(fd, mode)
        return f"/proc/{os.getpid()}/fd/{fd}"

    def file_fd(self, name: str) -> int:
        return self.files[self.names.index(name)]

    def link_out(self, name: str, final: str) -> None:
        """Give the file name its final name with link(2), which fails on any file or symlink at final and never
        follows it (the file system must support hard links)."""
        try:
            os.link(name, final, src_dir_fd=self.fd, follow_symlinks=False)
        except FileExistsError:
            raise VmsnapError(
                f"{final} exists (a file or symlink appeared there after this task checked); refusing to overwrite "
                "or follow it; nothing was changed.",
                path=final,
            ) from None

    def replace_out(self, name: str, target: str) -> None:
        """Rename the file name over target in one step (target itself, never what a symlink there points to)."""
        os.replace(name, target, src_dir_fd=self.fd)

    def close(self) -> None:
        """Remove the folder and what is left in it; a folder that is no longer ours at that name is left alone."""
        for fd in self.files:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            for name in os.listdir(self.fd):  # what this task made there (qemu-img makes nothing else)
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.fd)
        with contextlib.suppress(OSError):
            mine, there = os.fstat(self.fd), os.lstat(self.path)
            if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                os.rmdir(self.path)
        os.close(self.fd)
        self.files, self.names = [], []


def set_mode(path: str, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Explicit mode (and owner, when running as root) of a file this task created."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        set_fd_mode(fd, mode, owner)
    finally:
        os.close(fd)


def set_fd_mode(fd: int, mode: int, owner: tuple[int, int] | None = None) -> None:
    if owner is not None and os.geteuid() == 0:
        os.fchown(fd, owner[0], owner[1])
    os.fchmod(fd, mode)


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
