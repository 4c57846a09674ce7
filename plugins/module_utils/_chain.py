# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""External snapshots (overlay chains): dependants, planning and crash-safe execution for qcow2_chain."""

from __future__ import annotations

import os
import re
import stat
import struct
import time
import typing as t
from dataclasses import dataclass, field

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._files import (
    PrivateFolder,
    fsync_folder,
    set_fd_mode,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._qcow2_native import QCOW2_MAGIC, read_qcow2_layer
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import refuse_if_in_use

if t.TYPE_CHECKING:
    from ansible_collections.vmsnap.qemu.plugins.module_utils._image import ImageInfo
    from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg

_SIZE = re.compile(r"^[0-9]+[KMGTP]?$")
TEMP_SUFFIX = ".vmsnap-flatten.tmp"
CREATE_SUFFIX = ".vmsnap-create.tmp"
_BACKING_NAME_MAX = 1023  # QEMU's limit


def real(path: str) -> str:
    return os.path.realpath(path)


def _identity(path: str) -> tuple[int, int] | str:
    """The file a name leads to: device and inode (one stat, where realpath costs an lstat per path component,
    which made half of a 5,000-image dependants scan), or the real path of a name that leads nowhere."""
    try:
        st = os.stat(path)
    except OSError:
        return real(path)
    return (st.st_dev, st.st_ino)


def flatten_temp_path(path: str) -> str:
    """A fixed name beside path, so a run that was killed leaves at most one stale folder, removed next time."""
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + TEMP_SUFFIX)


def validate_size(size: str | None) -> str | None:
    if size is not None and not _SIZE.match(size):
        raise ValidationError(f"size {size!r} is not a qemu-img size such as 20G, 512M or 1073741824.")
    return size


@dataclass
class Dependants:
    found: list[str] = field(default_factory=list)  # images whose backing file is the target
    unreadable: list[str] = field(default_factory=list)  # images whose backing file could not be read: maybe


def find_dependants(qemu_img: QemuImg, target: str, search_dirs: list[str]) -> list[str]:
    """Images in search_dirs (not recursive) whose backing file is target."""
    return scan_dependants(qemu_img, target, search_dirs).found


def scan_dependants(qemu_img: QemuImg, target: str, search_dirs: list[str]) -> Dependants:
    """Images in search_dirs (not recursive) whose backing file is target, and those whose backing file could not be
    read (they may be dependants: a caller that deletes or rewrites target refuses them unless forced)."""
    wanted = _identity(target)
    result = Dependants()
    for folder in search_dirs:
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as exc:
            raise ValidationError(f"Cannot list search_dirs entry {folder}: {exc.strerror}.") from None
        for entry in entries:
            if entry.name.endswith(TEMP_SUFFIX) or not entry.is_file() or _identity(entry.path) == wanted:
                continue
            try:
                backing = _backing_of(qemu_img, entry.path)
                if backing is not None and _identity(backing) == wanted:
                    result.found.append(entry.path)
            except (VmsnapError, OSError, ValueError):
                # ValueError: a backing name with a NUL byte ("embedded null byte"); QEMU cannot use it either
                result.unreadable.append(entry.path)
    return result


def _backing_of(qemu_img: QemuImg, path: str) -> str | None:
    layer = read_qcow2_layer(path)
    if layer is not None:
        return layer.full_backing_file
    with open(path, "rb") as handle:
        head = handle.read(20)
        if head[:4] != QCOW2_MAGIC:
            return None  # raw and other formats have no backing file
        offset, length = struct.unpack(">QI", head[8:20]) if len(head) == 20 else (0, 0)
        if offset and 0 < length <= _BACKING_NAME_MAX:
            handle.seek(offset)
            if b"\0" in handle.read(length):
                # qemu-img shows the name cut at the NUL: a hostile or damaged image, not a known non-dependant
                raise ValueError("a NUL byte in the backing file name")
    return qemu_img.info(path, backing_chain=False).top.full_backing_file


@dataclass
class ChainPlan:
    path: str
    state: str
    info: ImageInfo | None  # path's chain as it is now; None when path does not exist
    action: str | None = None  # create | delete | commit | flatten | rebase
    backing: str | None = None
    backing_format: str | None = None
    size: str | None = None
    chain_after: list[str] = field(default_factory=list)
    dependants: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # images the dependants scan could not read (force: ignored)
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.action is not None

    @property
    def chain_before(self) -> list[str]:
        return _names(self.info)


@dataclass
class ChainRequest:
    path: str
    state: str
    backing: str | None
    max_depth: int
    search_dirs: list[str]
    size: str | None = None
    keep: bool = False
    force: bool = False


def plan_chain(qemu_img: QemuImg, request: ChainRequest) -> ChainPlan:
    path = request.path
    exists = os.path.lexists(path)
    if exists and not os.path.exists(path):
        raise ValidationError(
            f"{path} exists as a symlink to a missing file; refusing to overwrite or follow it; nothing was changed.",
            image_path=path,
        )
    info = qemu_img.info(path, backing_chain=True) if exists else None
    if info is not None and info.top.format != "qcow2":
        raise ValidationError(f"{path} is in {info.top.format} format; overlays are qcow2 images.", image_path=path)
    plan = ChainPlan(path=path, state=request.state, info=info, chain_after=_names(info))
    if request.backing is not None and real(request.backing) == real(path):
        raise ValidationError(f"path and backing are the same file ({path}); an image cannot back itself.")
    planner = {
        "present": _plan_present,
        "absent": _plan_absent,
        "committed": _plan_committed,
        "flattened": _plan_flattened,
        "rebased": _plan_rebased,
    }[request.state]
    planner(qemu_img, request, plan)
    return plan


def _plan_present(qemu_img: QemuImg, request: ChainRequest, plan: ChainPlan) -> None:
    backing = _require_backing(request)
    if plan.info is not None:
        current = plan.info.top.full_backing_file
        if current is None:
            raise ValidationError(
                f"{plan.path} exists and is not an overlay (it has no backing file); not touching it."
            )
        if real(current) != real(backing):
            raise ValidationError(f"{plan.path} exists as an overlay on {current}, not on {backing}; not touching it.")
        return
    folder = os.path.dirname(plan.path)
    if not os.path.isdir(folder):
        raise ValidationError(f"The folder of {plan.path} does not exist.")
    backing_info = _read_backing(qemu_img, plan.path, backing, request.max_depth)
    plan.action, plan.backing, plan.backing_format = "create", backing, backing_info.top.format
    plan.size = request.size
    plan.chain_after = [plan.path] + _names(backing_info)


def _plan_absent(qemu_img: QemuImg, request: ChainRequest, plan: ChainPlan) -> None:
    if plan.info is None:
        return
    _require_overlay(plan, request.backing)
    refuse_if_in_use(plan.info, plan.path)
    scan = scan_dependants(qemu_img, plan.path, request.search_dirs)
    plan.dependants, plan.unreadable = scan.found, scan.unreadable
    if plan.dependants:
        raise ValidationError(
            f"Refusing to delete {plan.path}: other images use it as their backing file "
            f"({', '.join(plan.dependants)}). Commit, flatten or delete them first. Nothing was changed.",
            dependants=plan.dependants,
        )
    if scan.unreadable and not request.force:
        raise ValidationError(
            f"Refusing to delete {plan.path}: the backing files of {', '.join(scan.unreadable)} could not be read, so "
            "they may use it. Nothing was changed. Fix or move them, or use force: true if they do not.",
            unreadable=scan.unreadable,
        )
    _warn_unreadable(plan, scan)
    plan.action, plan.chain_after = "delete", []


def _plan_committed(qemu_img: QemuImg, request: ChainRequest, plan: ChainPlan) -> None:
    if plan.info is None:
        if request.backing is None or not os.path.exists(request.backing):
            raise ValidationError(
                f"{plan.path} does not exist, and no existing backing was given to confirm that it was committed."
            )
        plan.warnings.append(
            f"{plan.path} does not exist; taking it as already committed into {request.backing}. "
            "If the path has a typo, nothing was committed."
        )
        plan.chain_after = _names(qemu_img.info(request.backing, backing_chain=True))
        return
    backing = _require_overlay(plan, request.backing)
    refuse_if_in_use(plan.info, plan.path)
    backing_info = qemu_img.info(backing, backing_chain=True)
    refuse_if_in_use(backing_info, backing)
    if plan.info.top.snapshots and not request.keep:
        raise ValidationError(
            f"{plan.path} holds internal snapshots ({', '.join(s.name for s in plan.info.top.snapshots)}) that "
            "would be lost when it is removed after the commit; delete them first or use keep: true."
        )
    scan = scan_dependants(qemu_img, backing, request.search_dirs)
    others = [dep for dep in scan.found if real(dep) != real(plan.path)]
    plan.dependants, plan.unreadable = others, scan.unreadable
    if others and not request.force:
        raise ValidationError(
            f"Refusing to commit {plan.path} into {backing}: other images use {backing} as their backing file "
            f"({', '.join(others)}) and would silently see the committed data. Use force: true if that is intended.",
            dependants=others,
        )
    if scan.unreadable and not request.force:
        raise ValidationError(
            f"Refusing to commit {plan.path} into {backing}: the backing files of {', '.join(scan.unreadable)} could "
            "not be read, so they may use it and would see the committed data. Nothing was changed. Fix or move "
            "them, or use force: true if they do not.",
            unreadable=scan.unreadable,
        )
    _warn_unreadable(plan, scan)
    if request.keep and qemu_img.allocated_bytes(plan.path) == 0:
        return  # already committed and emptied
    plan.action, plan.backing = "commit", backing
    plan.chain_after = ([plan.path] if request.keep else []) + _names(backing_info)


def _plan_flattened(qemu_img: QemuImg, request: ChainRequest, plan: ChainPlan) -> None:
    info = _require_existing(plan)
    if info.top.backing_file is None:
        return
    refuse_if_in_use(info, plan.path)
    if info.top.snapshots:
        raise ValidationError(
            f"{plan.path} holds internal snapshots ({', '.join(s.name for s in info.top.snapshots)}); flattening "
            "rewrites the image and would drop them. Delete them first."
        )
    plan.action, plan.chain_after = "flatten", [plan.path]


def _plan_rebased(qemu_img: QemuImg, request: ChainRequest, plan: ChainPlan) -> None:
    info = _require_existing(plan)
    backing = _require_backing(request)
    current = info.top.full_backing_file
    if current is not None and real(current) == real(backing):
        return
    refuse_if_in_use(info, plan.path)
    backing_info = _read_backing(qemu_img, plan.path, backing, request.max_depth)
    plan.action, plan.backing, plan.backing_format = "rebase", backing, backing_info.top.format
    plan.chain_after = [plan.path] + _names(backing_info)


def _warn_unreadable(plan: ChainPlan, scan: Dependants) -> None:
    if scan.unreadable:
        plan.warnings.append(
            f"force: true: going on although the backing files of {', '.join(scan.unreadable)} could not be read."
        )


def _require_backing(request: ChainRequest) -> str:
    if request.backing is None:
        raise ValidationError(f"state={request.state} needs backing.")
    return request.backing


def _require_existing(plan: ChainPlan) -> ImageInfo:
    if plan.info is None:
        raise ValidationError(f"{plan.path} does not exist.", image_path=plan.path)
    return plan.info


def _require_overlay(plan: ChainPlan, backing: str | None) -> str:
    info = _require_existing(plan)
    current = info.top.full_backing_file
    if current is None:
        raise ValidationError(
            f"{plan.path} is not an overlay (it has no backing file); "
            f"refusing state={plan.state} on a standalone image."
        )
    if backing is not None and real(current) != real(backing):
        raise ValidationError(f"{plan.path} is an overlay on {current}, not on {backing}.")
    return current


def _read_backing(qemu_img: QemuImg, path: str, backing: str, max_depth: int) -> ImageInfo:
    """The backing file's chain, refusing loops through path and chains deeper than max_depth."""
    if not os.path.exists(backing):
        raise ValidationError(f"Backing file {backing} does not exist.")
    backing_info = qemu_img.info(backing, backing_chain=True)
    if real(path) in {real(layer.filename) for layer in backing_info.chain}:
        raise ValidationError(f"Backing loop: {backing} already has {path} in its backing chain.")
    depth = len(backing_info.chain)
    if depth > max_depth:
        raise ValidationError(
            f"{path} on {backing} would be a chain of depth {depth} (backing files below the top), more than "
            f"max_depth={max_depth}. Commit or flatten the chain first, or raise max_depth.",
            chain_depth=depth,
        )
    return backing_info


def _names(info: ImageInfo | None) -> list[str]:
    return info.filenames() if info else []


@dataclass
class Outcome:
    bytes_moved: int = 0
    seconds: float = 0.0


def execute_chain(
    qemu_img: QemuImg, plan: ChainPlan, keep: bool, compress: bool, unsafe: bool, verify: bool
) -> Outcome:
    started = time.monotonic()
    outcome = Outcome()
    if plan.action == "create":
        create_overlay(qemu_img, plan)
    elif plan.action == "delete":
        try:
            os.unlink(plan.path)
        except OSError as exc:
            raise VmsnapError(f"Cannot delete {plan.path}: {exc.strerror or exc}; nothing was changed.") from None
    elif plan.action == "commit":
        outcome.bytes_moved = qemu_img.allocated_bytes(plan.path)
        qemu_img.commit(plan.path, drop_top=not keep)
        if not keep:
            try:
                os.unlink(plan.path)
            except OSError as exc:
                raise VmsnapError(
                    f"{plan.path} was committed into {plan.backing}, but deleting it failed: {exc.strerror or exc}. "
                    "Its data is in the backing file now; delete it by hand.",
                    changed=True,
                ) from None
    elif plan.action == "flatten":
        outcome.bytes_moved = flatten(qemu_img, plan, compress=compress, verify=verify)
    elif plan.action == "rebase":
        qemu_img.rebase(plan.path, t.cast(str, plan.backing), t.cast(str, plan.backing_format), unsafe=unsafe)
    outcome.seconds = round(time.monotonic() - started, 3)
    return outcome


def create_overlay(qemu_img: QemuImg, plan: ChainPlan) -> None:
    """qemu-img creates the overlay in a file this task made in a private 0700 folder beside path (it writes
    through /proc/<pid>/fd/<n>, so nothing planted or swapped in can redirect it), the file gets the backing file's
    owner (as root) and permission bits set explicitly (no umask), and link(2) gives it its name: a file or symlink
    planted at path since the plan makes it fail, and is never followed."""
    with PrivateFolder(plan.path, CREATE_SUFFIX) as folder:
        name = os.path.basename(plan.path)
        temp = folder.create(name)
        # backing is absolute (validated), so qemu-img resolves it the same from the private folder
        qemu_img.create_overlay(temp, t.cast(str, plan.backing), t.cast(str, plan.backing_format), plan.size)
        try:
            backing = os.stat(t.cast(str, plan.backing))
            # an overlay takes the guest's writes: a read-only golden image (0444) must not give a read-only overlay
            fd = folder.file_fd(name)
            set_fd_mode(fd, (backing.st_mode & 0o777) | stat.S_IWUSR, (backing.st_uid, backing.st_gid))
            os.fsync(fd)
            folder.link_out(name, plan.path)
        except OSError as exc:
            raise VmsnapError(
                f"Cannot create the overlay {plan.path}: {exc.strerror or exc}; nothing was changed."
            ) from None
        try:
            fsync_folder(os.path.dirname(plan.path))
        except OSError as exc:
            raise VmsnapError(
                f"The overlay {plan.path} was created, but syncing its folder failed: {exc.strerror or exc}.",
                changed=True,
            ) from None


def flatten(qemu_img: QemuImg, plan: ChainPlan, compress: bool, verify: bool) -> int:
    """Write the whole chain into a file in a private folder beside path, check it, then rename it over path
    atomically.

    Until the rename, path and its chain are untouched; after it, path is the complete new image.
    """
    target = real(plan.path)  # replace the image itself, not a symlink pointing to it
    info = t.cast("ImageInfo", plan.info)
    with PrivateFolder(target, TEMP_SUFFIX) as folder:  # a leftover of a killed run is removed by the next run
        name = os.path.basename(target)
        temp = folder.create(name)
        qemu_img.convert_standalone(plan.path, temp, compress=compress, bitmaps=bool(info.top.bitmaps))
        if verify and not qemu_img.compare(plan.path, temp):
            raise VmsnapError(
                f"The flattened copy of {plan.path} does not read the same as the chain; "
                f"{plan.path} was left as it was."
            )
        try:
            original = os.stat(target)
            fd = folder.file_fd(name)
            set_fd_mode(fd, original.st_mode & 0o7777, (original.st_uid, original.st_gid))
            os.fsync(fd)
            size = os.fstat(fd).st_blocks * 512
            folder.replace_out(name, target)
        except OSError as exc:
            raise VmsnapError(
                f"Cannot put the flattened copy of {plan.path} in place: {exc.strerror or exc}; "
                f"{plan.path} was left as it was."
            ) from None
        try:
            fsync_folder(os.path.dirname(target))
        except OSError as exc:
            raise VmsnapError(
                f"{plan.path} was flattened, but syncing its folder failed: {exc.strerror or exc}.", changed=True
            ) from None
        return size
