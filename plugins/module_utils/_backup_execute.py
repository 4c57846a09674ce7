# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Backup sets of qcow2_backup, the acting half: read the disks and sets, decide (see _backup), then write.

Offline full backups go through qemu-img (bitmap add, convert, compare); incrementals, and everything on a running
VM, through the QMP backup engine (_backup_qmp: blockdev-backup in one transaction; for an offline image a helper
qemu-storage-daemon). Every backup is checked and checksummed before it is renamed into place and recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import time
import typing as t
from dataclasses import dataclass, field

from ansible_collections.vmsnap.qemu.plugins.module_utils import _backup as B
from ansible_collections.vmsnap.qemu.plugins.module_utils import _backup_qmp as E
from ansible_collections.vmsnap.qemu.plugins.module_utils._bitmap_names import bitmap_name
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import (
    ImageInUseError,
    InsufficientSpaceError,
    QemuImgError,
    ValidationError,
    VmsnapError,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._files import (
    claimed,
    create_exclusive,
    fsync_file,
    fsync_folder,
    set_mode,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._lock import image_locks
from ansible_collections.vmsnap.qemu.plugins.module_utils._qcow2_native import probe_qemu_locks, read_qcow2_layer
from ansible_collections.vmsnap.qemu.plugins.module_utils._retention import PeriodRules
from ansible_collections.vmsnap.qemu.plugins.module_utils._validate import validate_image_path

if t.TYPE_CHECKING:
    from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
    from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient

Warn = t.Callable[[str], None]

_CHUNK = 4 * 1024 * 1024
# Room kept free beyond the estimate: the index, qcow2 metadata growth, rounding.
_SPACE_MARGIN = 4 * 1024 * 1024
_RESTORE_TEMP = ".tmp-vmsnap-restore-"


# ---------------------------------------------------------------------------------------------------------------
# Disks and their sets


@dataclass
class Target:
    """One disk and its backup set."""

    label: str  # for messages: the image path or the VM's device
    set_name: str
    folder: str
    source: str | None  # realpath of the bottom image (None: only the set was named)
    virtual_size: int | None
    image: str | None = None  # offline: the image given (top of its chain)
    node: str | None = None  # live: the disk's active node
    device: str | None = None
    index: dict[str, t.Any] | None = None
    bitmaps: dict[str, B.BitmapView] = field(default_factory=dict)
    # filled by the present plan
    decision: B.Decision | None = None
    broken: str | None = None
    dirty_bytes: int | None = None
    backup: dict[str, t.Any] | None = None
    pruned: list[str] = field(default_factory=list)
    prune_plan: B.PrunePlan | None = None
    stale_bitmaps: list[str] = field(default_factory=list)
    old_bitmap: str | None = None
    cleaned: list[str] = field(default_factory=list)
    before: list[str] = field(default_factory=list)
    verified: list[dict[str, t.Any]] | None = None

    @property
    def index_path(self) -> str:
        return os.path.join(self.folder, B.INDEX_NAME)

    def file(self, name: str) -> str:
        return os.path.join(self.folder, name)


def target_from_image(qemu_img: QemuImg, path: str, dest_dir: str, set_name: str | None) -> tuple[Target, t.Any]:
    validate_image_path(path)
    info = qemu_img.info(path, backing_chain=True)
    bottom = os.path.realpath(info.chain[-1].filename if os.path.isabs(info.chain[-1].filename) else path)
    name = set_name or B.default_set_name(bottom)
    target = Target(
        label=path,
        set_name=name,
        folder=os.path.join(dest_dir, name),
        source=bottom,
        virtual_size=info.top.virtual_size,
        image=path,
    )
    target.bitmaps = B.bitmaps_from_flags(info.top.bitmaps)
    return target, info


def targets_from_vm(qmp: QmpClient, devices: list[str] | None, dest_dir: str, set_name: str | None) -> list[Target]:
    from ansible_collections.vmsnap.qemu.plugins.module_utils._vm import describe_vm

    vm = describe_vm(qmp)
    disks = [disk for disk in vm["block_devices"] if disk.get("node_name")]
    if devices:
        chosen = []
        for wanted in devices:
            match = [d for d in disks if wanted in (d.get("device"), d.get("node_name"), d.get("qdev"))]
            if not match:
                names = ", ".join(str(d.get("device") or d.get("node_name")) for d in disks)
                raise ValidationError(
                    f"The VM at {qmp.path} has no disk {wanted!r}; its disks are: {names or 'none'}.",
                    devices=devices,
                )
            if match[0] not in chosen:
                chosen.append(match[0])
    else:
        chosen = [d for d in disks if d.get("writable")]
    if not chosen:
        raise ValidationError(f"The VM at {qmp.path} has no writable disk to back up.")
    if set_name and len(chosen) > 1:
        raise ValidationError(
            "set_name names the set of one disk; with several disks, leave it out (each disk's set "
            "is named after its bottom image) or choose one disk with devices."
        )
    targets = []
    for disk in chosen:
        if disk.get("format") != "qcow2":
            raise ValidationError(
                f"Disk {disk.get('device') or disk.get('node_name')} of the VM is {disk.get('format')}, not qcow2: "
                "incremental backups need a persistent dirty bitmap, which only qcow2 stores. Leave it out with "
                "devices.",
            )
        bottom = os.path.realpath(disk["chain"][-1]["filename"])
        name = set_name or B.default_set_name(bottom)
        target = Target(
            label=str(disk.get("device") or disk.get("node_name")),
            set_name=name,
            folder=os.path.join(dest_dir, name),
            source=bottom,
            virtual_size=int(disk["chain"][0]["virtual_size"]),
            node=disk["node_name"],
            device=disk.get("device"),
        )
        targets.append(target)
    names = [target.set_name for target in targets]
    if len(set(names)) != len(names):
        raise ValidationError(f"Two disks of the VM would share a backup set ({', '.join(sorted(names))}).")
    return targets


def target_from_set(dest_dir: str, set_name: str) -> Target:
    return Target(
        label=set_name, set_name=set_name, folder=os.path.join(dest_dir, set_name), source=None, virtual_size=None
    )


def load_set(target: Target) -> None:
    """Read the set's index; refuse a set of another disk. A missing folder is an empty set."""
    if not B.check_set_folder(target.folder):
        target.index = None
        return
    target.index = B.read_index(target.index_path)
    if target.index is not None and target.source is not None:
        B.check_index_source(target.index, target.index_path, target.source)
    target.before = [entry["id"] for entry in B.backups_of(target.index)]


def require_index(target: Target) -> dict[str, t.Any]:
    if target.index is None or not B.backups_of(target.index):
        raise ValidationError(
            f"The backup set {target.folder} has no backups (no index {B.INDEX_NAME}). Nothing was changed.",
            set=target.set_name,
        )
    return target.index


def ensure_folder(target: Target) -> None:
    if not os.path.isdir(target.folder):
        os.mkdir(target.folder, 0o700)
        fsync_folder(os.path.dirname(target.folder))


def cleanup_leftovers(target: Target, check_mode: bool) -> list[str]:
    """Temporary files of killed runs and backup files the index does not list (no process of ours owns them:
    the set is locked). Returns their names; check mode only lists them.

    Backup files in a folder without an index are refused, not cleaned: the index was lost or moved, and those
    files are the only copy of the backups. An unrecorded file that a recorded backup file really uses as its
    backing file (a prune killed between its rename and its index write) is kept."""
    unrecorded = B.unrecorded_backup_files(target.folder, target.index)
    if target.index is None and unrecorded:
        raise ValidationError(
            f"Set folder {target.folder} holds backup files ({', '.join(unrecorded)}) but no {B.INDEX_NAME}: "
            "its index was lost or moved, and this module does not guess what the files are. Nothing was changed; "
            f"put the index back, or move the files elsewhere to start a new set.",
            set_folder=target.folder,
            files=unrecorded,
        )
    used = _real_backing_names(target)
    orphans = [name for name in unrecorded if used is not None and name not in used]
    names = B.leftover_temp_files(target.folder) + orphans
    if not check_mode:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target.file(name))
        if names:
            fsync_folder(target.folder)
    return names


def _real_backing_names(target: Target) -> set[str] | None:
    """File names that the recorded backup files' own headers name as their backing file; None when a header could
    not be read (then no unrecorded file is deleted)."""
    used = set()
    for entry in B.backups_of(target.index):
        path = target.file(entry["file"])
        if not os.path.exists(path):
            continue
        layer = read_qcow2_layer(path)
        if layer is None:
            return None
        if layer.backing_file:
            used.add(os.path.basename(layer.backing_file))
    return used


# ---------------------------------------------------------------------------------------------------------------
# qemu-img helpers


def layer_spec(path: str) -> str:
    """One qcow2 file without its backing chain (what this backup file itself defines)."""
    return "json:" + json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": path}, "backing": None})


def layer_digest(qemu_img: QemuImg, path: str, scratch: str) -> tuple[str, int]:
    """(sha256, bytes defined) of what one backup file itself shows the guest, independent of its backing files.

    The canonical form is the file's allocated extents, merged (data or zero, start, length), with the data's guest
    bytes; unallocated ranges (which fall through to the parent) are not part of it. Uncompressed data is read
    straight from the file at the host offsets qemu-img map reports; compressed clusters are decompressed by a
    qemu-img convert of the layer alone into a sparse raw file in scratch. Reading only this file's own data keeps an
    incremental's checksum proportional to its changes.
    """
    extents = _checked_extents(qemu_img.run_json(["map", "--output=json", "--", layer_spec(path)]), path)
    merged: list[list[t.Any]] = []  # [kind, start, length, pieces[(from_raw, offset, length)]]
    need_raw = False
    for ext in extents:
        if not ext.get("present"):
            continue
        start, length = int(ext["start"]), int(ext["length"])
        kind = "zero" if ext.get("zero") or not ext.get("data") else "data"
        pieces = []
        if kind == "data":
            if "offset" in ext:
                pieces.append((False, int(ext["offset"]), length))
            else:
                pieces.append((True, start, length))
                need_raw = True
        if merged and merged[-1][0] == kind and merged[-1][1] + merged[-1][2] == start:
            merged[-1][2] += length
            merged[-1][3].extend(pieces)
        else:
            merged.append([kind, start, length, pieces])
    raw = os.path.join(scratch, f"{B.TMP_PREFIX}verify-{os.getpid()}-{time.monotonic_ns()}.raw")
    digest = hashlib.sha256(b"vmsnap-layer-1\n")
    defined = 0
    try:
        if need_raw:
            with claimed(raw) as raw_name:
                qemu_img.run(["convert", "-q", "-O", "raw", "--", layer_spec(path), raw_name])
        with open(path, "rb") as image, contextlib.ExitStack() as stack:
            raw_file = stack.enter_context(open(raw, "rb")) if need_raw else None
            for kind, start, length, pieces in merged:
                digest.update(f"{kind} {start} {length}\n".encode("ascii"))
                defined += length
                for from_raw, offset, size in pieces:
                    source = raw_file if from_raw else image
                    _hash_range(digest, t.cast("t.BinaryIO", source), offset, size)
    finally:
        if need_raw:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(raw)
    return digest.hexdigest(), defined


def _checked_extents(extents: t.Any, path: str) -> list[dict[str, t.Any]]:
    """qemu-img map's extents, each with whole-number start, length and (when given) offset, or the error family."""
    if not isinstance(extents, list):
        raise B.BackupError(f"Unexpected qemu-img map output for {path}: not a list of extents.")
    for ext in extents:
        fields = ("start", "length", "offset") if isinstance(ext, dict) and "offset" in ext else ("start", "length")
        if not isinstance(ext, dict) or not all(_whole(ext.get(name)) for name in fields):
            raise B.BackupError(f"Unexpected qemu-img map output for {path}: an extent without {'/'.join(fields)}.")
    return extents


def _whole(value: t.Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _hash_range(digest: t.Any, handle: t.BinaryIO, offset: int, size: int) -> None:
    fd = handle.fileno()
    while size > 0:
        chunk = os.pread(fd, min(_CHUNK, size), offset)
        if not chunk:
            raise B.BackupError(f"{handle.name} ends before offset {offset}: the file is truncated.")
        digest.update(chunk)
        offset += len(chunk)
        size -= len(chunk)


def measure_required(qemu_img: QemuImg, path: str, force_share: bool) -> int:
    args = ["measure", "--output=json", "-O", "qcow2"] + (["-U"] if force_share else []) + ["--", path]
    measured = qemu_img.run_json(args)
    required = measured.get("required") if isinstance(measured, dict) else None
    if not _whole(required):
        raise B.BackupError(f"Unexpected qemu-img measure output for {path}: no 'required' size in {measured!r:.200}.")
    return t.cast(int, required)


def free_bytes(folder: str) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def refuse_without_space(needs: dict[str, int], what: str) -> None:
    """needs: folder -> bytes; folders on one filesystem add up."""
    per_fs: dict[int, tuple[str, int]] = {}
    for folder, needed in needs.items():
        device = os.stat(folder).st_dev
        first, total = per_fs.get(device, (folder, 0))
        per_fs[device] = (first, total + needed)
    for folder, needed in per_fs.values():
        free = free_bytes(folder)
        if needed + _SPACE_MARGIN > free:
            raise InsufficientSpaceError(
                f"Not enough free space in {folder} for {what}: it needs about {needed + _SPACE_MARGIN} bytes, "
                f"{free} are free. Nothing was written.",
                needed_bytes=needed + _SPACE_MARGIN,
                free_bytes=free,
                folder=folder,
            )


def add_bitmap_offline(qemu_img: QemuImg, image: str, name: str) -> None:
    qemu_img.run(["bitmap", "--add", "-f", "qcow2", "--", image, name])


def remove_bitmap_offline(qemu_img: QemuImg, image: str, name: str) -> None:
    qemu_img.run(["bitmap", "--remove", "-f", "qcow2", "--", image, name])


def image_is_clean(qemu_img: QemuImg, path: str) -> str | None:
    """None when qemu-img check finds nothing, else what it found."""
    result = qemu_img.check(path)
    if result.get("rc") == 0:
        return None
    if result.get("corruptions") or result.get("check-errors") or result.get("rc") == 2:
        corruptions, errors = result.get("corruptions", 0), result.get("check-errors", 0)
        return f"qemu-img check found {corruptions} corruption(s), {errors} error(s)"
    return f"qemu-img check found {result.get('leaks', 0)} leaked cluster(s)"


# ---------------------------------------------------------------------------------------------------------------
# present


@dataclass
class Job:
    """A backup to take for one target (the engine's DiskJob is built from it)."""

    target: Target
    mode: str
    backup_id: str
    temp: str
    bitmap: str  # full: the new bitmap; incremental: the chain's bitmap
    chain: str
    parent: dict[str, t.Any] | None
    epoch: float


def plan_present(
    target: Target, mode: str, on_broken_chain: str, skip_unchanged: bool, dirty_bytes: t.Callable[[str], int | None]
) -> None:
    """Fill target.decision (and the stale bitmaps). dirty_bytes(bitmap) reads a healthy chain bitmap's count."""
    virtual_size = t.cast(int, target.virtual_size)  # set by every target_from_* before planning
    target.broken = B.broken_chain_reason(target.index, target.bitmaps, target.folder, virtual_size)
    index = target.index
    healthy_bitmap = index.get("bitmap") if index and target.broken is None and B.newest(index) else None
    if healthy_bitmap and skip_unchanged:
        target.dirty_bytes = dirty_bytes(healthy_bitmap)
    target.decision = B.decide_present(
        index, mode, target.broken, on_broken_chain, skip_unchanged, target.dirty_bytes, target.set_name
    )
    keep = {index["bitmap"]} if index and index.get("bitmap") and not index.get("pending") else set()
    target.stale_bitmaps = B.own_stale_bitmaps(target.set_name, target.bitmaps, keep, B.known_chains(index))


def taken_ids(target: Target) -> set[str]:
    taken = {entry["id"] for entry in B.backups_of(target.index)}
    pending = (target.index or {}).get("pending") or {}
    if pending.get("id"):
        taken.add(pending["id"])
    return taken


def new_job(target: Target, backup_id: str, now: float) -> Job:
    decision = t.cast(B.Decision, target.decision)  # plan_present() ran first
    if decision.action == "full":
        chain = B.new_chain_id()
        bitmap = bitmap_name(target.set_name, chain)
        parent = None
    else:
        index = t.cast("dict[str, t.Any]", target.index)
        chain = str(index["chain"])
        bitmap = str(index["bitmap"])
        parent = B.newest(index)
    return Job(
        target=target,
        mode=decision.action,
        backup_id=backup_id,
        temp=target.file(B.temp_file_name(backup_id)),
        bitmap=bitmap,
        chain=chain,
        parent=parent,
        epoch=now,
    )


def predicted_backup(job: Job) -> dict[str, t.Any]:
    target = job.target
    return {
        "id": job.backup_id,
        "file": target.file(B.backup_file_name(job.backup_id, job.mode)),
        "mode": job.mode,
        "parent": job.parent["id"] if job.parent else None,
        "size": None,
        "changed_bytes": target.dirty_bytes if job.mode == "incremental" else None,
        "seconds": None,
        "time": B.iso_time(job.epoch),
        "full_reason": target.decision.full_reason if target.decision else None,
        "compressed": None,
        "sha256": None,
        "verified_at": None,
    }


def finish_backup(
    qemu_img: QemuImg, job: Job, compress: bool, compare_with: str | None, started: float
) -> dict[str, t.Any]:
    """The new backup file is complete in job.temp: check it, checksum it, rename it into place, record it."""
    target = job.target
    index = t.cast("dict[str, t.Any]", target.index)
    problem = image_is_clean(qemu_img, job.temp)
    if problem:
        raise B.BackupError(f"Set {target.set_name}: the new backup {job.temp} is damaged: {problem}.")
    verified_at = None
    if compare_with is not None:
        if not qemu_img.compare(compare_with, job.temp):
            raise B.BackupError(
                f"Set {target.set_name}: the new backup does not show the same data as {compare_with} "
                "(qemu-img compare); it was not recorded."
            )
        verified_at = time.time()
    digest, defined = layer_digest(qemu_img, job.temp, target.folder)
    set_mode(job.temp, 0o600)
    fsync_file(job.temp)
    final = target.file(B.backup_file_name(job.backup_id, job.mode))
    os.rename(job.temp, final)
    fsync_folder(target.folder)
    entry = B.record_backup(
        index,
        backup_id=job.backup_id,
        mode=job.mode,
        parent=job.parent["id"] if job.parent else None,
        chain=job.chain,
        bitmap=job.bitmap,
        epoch=job.epoch,
        size=os.stat(final).st_size,
        changed_bytes=defined,
        seconds=time.monotonic() - started,
        compressed=compress,
        sha256=digest,
        verified_at=verified_at,
        full_reason=target.decision.full_reason if target.decision else None,
    )
    B.write_index(target.index_path, index)
    return entry


def write_pending(job: Job) -> None:
    """Before the step that clears the chain's bitmap for good (the incremental job's finalize)."""
    index = t.cast("dict[str, t.Any]", job.target.index)
    index["pending"] = {"id": job.backup_id, "time": B.iso_time(job.epoch), "temp": os.path.basename(job.temp)}
    B.write_index(job.target.index_path, index)


def offline_full(qemu_img: QemuImg, job: Job, compress: bool, verify: bool) -> dict[str, t.Any]:
    """qemu-img: the new chain's bitmap first (a write that slips in later is recorded), convert (flattens a chain),
    compare, checksum, rename, record. Until the record, the old chain's bitmap is untouched, so a killed run costs
    nothing: the next run still takes an incremental on the old chain (and removes the stale new bitmap)."""
    target = job.target
    image = t.cast(str, target.image)
    started = time.monotonic()
    add_bitmap_offline(qemu_img, image, job.bitmap)
    created = False  # a file planted at the temp name is refused by claimed() and never removed
    try:
        with claimed(job.temp) as temp_name:
            created = True
            qemu_img.run(["convert", "-q", "-O", "qcow2"] + (["-c"] if compress else []) + ["--", image, temp_name])
        return finish_backup(qemu_img, job, compress, image if verify else None, started)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(job.temp)
        with contextlib.suppress(VmsnapError):
            remove_bitmap_offline(qemu_img, image, job.bitmap)
        raise


def offline_dirty_bytes(image: str, timeout: float, binary: str | None) -> t.Callable[[str], int | None]:
    """The chain bitmap's count, read by a read-only helper qemu-storage-daemon (qemu-img cannot tell it)."""

    def read(bitmap: str) -> int | None:
        with E.storage_daemon(image, read_only=True, timeout=timeout, binary=binary) as (qmp, node):
            state = E.bitmaps_of(qmp, node).get(bitmap)
        return None if state is None else int(state.count)

    return read


def offline_incremental(
    qemu_img: QemuImg,
    job: Job,
    compress: bool,
    verify: bool,
    timeout: float,
    connect_timeout: float,
    binary: str | None,
) -> dict[str, t.Any]:
    target = job.target
    image = t.cast(str, target.image)
    parent = t.cast("dict[str, t.Any]", job.parent)
    started = time.monotonic()
    pending: list[bool] = []

    def before_finalize() -> None:
        write_pending(job)
        pending.append(True)

    try:
        with E.storage_daemon(image, read_only=False, timeout=max(connect_timeout, 30.0), binary=binary) as (
            qmp,
            node,
        ):
            disk_job = E.DiskJob(
                node=node,
                target=job.temp,
                virtual_size=int(t.cast(int, target.virtual_size)),
                sync="bitmap",
                bitmap=job.bitmap,
                backing=target.file(parent["file"]),
                compress=compress,
            )
            E.run_backup_jobs(qmp, qemu_img, [disk_job], timeout, before_finalize)
        return finish_backup(qemu_img, job, compress, image if verify else None, started)
    except VmsnapError as exc:
        _unlink_quietly(job.temp)
        if pending:
            # The bitmap is cleared for good: the pending record stays, so the next run takes a full backup.
            exc.msg += " The chain's bitmap was already cleared, so the next run takes a full backup."
        raise
    except BaseException:
        _unlink_quietly(job.temp)
        raise


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def live_backups(
    qemu_img: QemuImg, qmp: QmpClient, jobs: list[Job], compress: bool, timeout: float
) -> list[dict[str, t.Any]]:
    """All chosen disks of a running VM in one transaction (grouped completion when several): one instant."""
    started = time.monotonic()
    disk_jobs = []
    for job in jobs:
        parent = job.parent
        disk_jobs.append(
            E.DiskJob(
                node=t.cast(str, job.target.node),
                target=job.temp,
                virtual_size=int(t.cast(int, job.target.virtual_size)),
                sync="full" if job.mode == "full" else "bitmap",
                bitmap=job.bitmap,
                backing=job.target.file(parent["file"]) if parent else None,
                compress=compress,
            )
        )
    pending: list[Job] = []

    def before_finalize() -> None:
        for job in jobs:
            if job.mode == "incremental":
                write_pending(job)
                pending.append(job)

    try:
        E.run_backup_jobs(qmp, qemu_img, disk_jobs, timeout, before_finalize)
    except BaseException:
        for job in jobs:
            with contextlib.suppress(OSError):
                os.unlink(job.temp)
        raise
    entries = []
    for job in jobs:
        try:
            entries.append(finish_backup(qemu_img, job, compress, None, started))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(job.temp)
            if job.mode == "full":
                with contextlib.suppress(VmsnapError):
                    E.remove_bitmap(qmp, t.cast(str, job.target.node), job.bitmap)
            raise
    return entries


def drop_bitmaps(target: Target, names: list[str], qemu_img: QemuImg, qmp: QmpClient | None) -> list[str]:
    """Remove bitmaps of this set only (old chains, stale ones); never another set's or another tool's."""
    removed = []
    for name in names:
        parsed = B.own_stale_bitmaps(target.set_name, [name], (), B.known_chains(target.index))
        if not parsed:
            continue
        if qmp is not None:
            E.remove_bitmap(qmp, t.cast(str, target.node), name)
        else:
            remove_bitmap_offline(qemu_img, t.cast(str, target.image), name)
        removed.append(name)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# verified


def verify_backup(qemu_img: QemuImg, target: Target, entry: dict[str, t.Any]) -> list[str]:
    """Problems of one backup file (empty: it is as recorded)."""
    index = t.cast("dict[str, t.Any]", target.index)
    path = target.file(entry["file"])
    if not os.path.isfile(path):
        return [f"the file {entry['file']} is missing"]
    problems = []
    try:
        info = qemu_img.info(layer_spec(path), backing_chain=False)
    except QemuImgError as exc:
        return [f"qemu-img cannot open {entry['file']}: {exc.stderr.strip() or exc.msg}"]
    top = info.top
    if top.virtual_size != int(index.get("virtual_size") or 0):
        problems.append(f"its virtual size is {top.virtual_size}, the set's is {index.get('virtual_size')}")
    parent = entry.get("parent")
    if parent is not None:
        parent_file = next((e["file"] for e in B.backups_of(index) if e["id"] == parent), None)
        if top.backing_file is None or os.path.basename(top.backing_file) != parent_file:
            problems.append(f"its backing file is {top.backing_file}, not {parent_file}")
    elif top.backing_file:
        problems.append(f"it is recorded as standalone but has the backing file {top.backing_file}")
    try:
        problem = image_is_clean(qemu_img, path)
        if problem:
            problems.append(problem)
        if not problems:
            digest, dummy = layer_digest(qemu_img, path, target.folder)
            if not entry.get("sha256"):
                problems.append("the index records no checksum for it")
            elif digest != entry["sha256"]:
                problems.append("its content does not match the checksum recorded when it was written")
    except QemuImgError as exc:
        # qemu-img check opens the backing chain: a missing or unreadable backing file ends up here.
        problems.append(f"qemu-img cannot check {entry['file']}: {exc.stderr.strip() or exc.msg}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# restored


def restore_temp(restore_to: str) -> str:
    folder, name = os.path.split(restore_to)
    return os.path.join(folder, f".{name}{_RESTORE_TEMP}{os.getpid()}")


def stale_restore_temps(restore_to: str) -> list[str]:
    folder, name = os.path.split(restore_to)
    prefix = f".{name}{_RESTORE_TEMP}"
    try:
        return sorted(os.path.join(folder, entry) for entry in os.listdir(folder) if entry.startswith(prefix))
    except FileNotFoundError:
        return []


def check_restore_to(restore_to: t.Any) -> str:
    path = validate_image_path(restore_to, must_exist=False, what="restore_to")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise ValidationError(f"The folder of restore_to ({folder}) does not exist.", restore_to=path)
    if os.path.lexists(path):
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ValidationError(f"restore_to {path} exists and is not a regular file.", restore_to=path)
    return path


def restored_matches(qemu_img: QemuImg, restore_to: str, backup_file: str, restore_as: str) -> bool:
    """Whether restore_to already is this restore (same guest data; standalone, or an overlay on backup_file)."""
    try:
        info = qemu_img.info(restore_to, backing_chain=False)
    except QemuImgError:
        return False
    backing = info.top.full_backing_file or info.top.backing_file
    if restore_as == "chain":
        if backing is None or os.path.realpath(backing) != os.path.realpath(backup_file):
            return False
    elif backing is not None or info.top.format != "qcow2":
        return False
    return qemu_img.compare(backup_file, restore_to)


def restore(qemu_img: QemuImg, backup_file: str, restore_to: str, restore_as: str, verify: bool) -> None:
    temp = restore_temp(restore_to)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)  # a file or symlink itself, never its target
    try:
        with claimed(temp) as temp_name:
            if restore_as == "chain":
                qemu_img.create_overlay(temp_name, os.path.abspath(backup_file), "qcow2")
            else:
                qemu_img.run(["convert", "-q", "-O", "qcow2", "--", backup_file, temp_name])
        if verify and not qemu_img.compare(backup_file, temp):
            raise B.BackupError(f"The restored image does not show the data of {backup_file}; nothing was replaced.")
        with contextlib.suppress(FileNotFoundError):  # a replaced disk keeps its mode and owner; a new one is 0600
            current = os.stat(restore_to)
            set_mode(temp, current.st_mode & 0o7777, (current.st_uid, current.st_gid))
        fsync_file(temp)
        os.rename(temp, restore_to)
        fsync_folder(os.path.dirname(restore_to))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


# ---------------------------------------------------------------------------------------------------------------
# pruned


def merged_backups(index: dict[str, t.Any], plan: B.PrunePlan) -> list[str]:
    """The backups whose data the merges of a prune read into a kept backup: each rebased kept backup and the
    removed ancestors it absorbs (up to, not including, its new parent). The merged file gets a fresh checksum, so
    damage in any of them would be recorded as good."""
    by_id = {entry["id"]: entry for entry in B.backups_of(index)}
    merged: list[str] = []
    for child_id, new_parent in plan.rebase:
        current: str | None = child_id
        while current is not None and current != new_parent and current in by_id:
            if current not in merged:
                merged.append(current)
            current = by_id[current].get("parent")
    return merged


def check_merged_backups(qemu_img: QemuImg, target: Target, plan: B.PrunePlan) -> None:
    """Refuse the prune (before anything changes) when a backup a merge reads is not as the index records it."""
    index = t.cast("dict[str, t.Any]", target.index)
    by_id = {entry["id"]: entry for entry in B.backups_of(index)}
    failures = []
    for backup_id in merged_backups(index, plan):
        problems = verify_backup(qemu_img, target, by_id[backup_id])
        if problems:
            failures.append(f"backup {backup_id}: {'; '.join(problems)}")
    if failures:
        raise B.BackupError(
            f"Set {target.set_name}: cannot prune, a backup the merge into a kept backup reads fails verification ("
            + " | ".join(failures)
            + "). Merging it would record the damage as good data. Nothing was pruned or merged.",
            set=target.set_name,
        )


def real_backing(qemu_img: QemuImg, target: Target, name: str) -> str | None:
    """The file a backup file really uses as its backing file (its qcow2 header, whatever the index says), as a
    normalized path; None when it has none. A relative backing name is relative to the set folder."""
    try:
        info = qemu_img.info(layer_spec(target.file(name)), backing_chain=False)
    except QemuImgError as exc:
        raise B.BackupError(
            f"Set {target.set_name}: cannot prune, qemu-img cannot read {name} to learn which file it depends on: "
            f"{exc.stderr.strip() or exc.msg}. Nothing was deleted.",
            set=target.set_name,
        ) from None
    backing = info.top.backing_file
    return os.path.realpath(os.path.join(target.folder, backing)) if backing else None


def refuse_deleting_used_files(
    qemu_img: QemuImg, target: Target, removed: t.Iterable[str], staying: t.Iterable[str], done: str, changed: bool
) -> None:
    """Refuse to delete a file that a file staying in the set really uses as its backing file (the index can be
    behind the files: a merge renamed into place by a run killed before it updated the index)."""
    going = {os.path.realpath(target.file(name)): name for name in removed}
    users = []
    for name in staying:
        if not os.path.isfile(target.file(name)):
            continue
        backing = real_backing(qemu_img, target, name)
        if backing in going:
            users.append(f"{name} is backed by {going[backing]}")
    if users:
        raise B.BackupError(
            f"Set {target.set_name}: cannot prune, a backup that stays really depends on a backup that would be "
            f"deleted ({'; '.join(users)}), although the index says otherwise: the set's files and its index "
            f"disagree (an interrupted merge, or a file changed by hand). {done} Check the set with state=verified.",
            set=target.set_name,
            changed=changed,
        )


def execute_prune(qemu_img: QemuImg, target: Target, plan: B.PrunePlan) -> None:
    """Check the backups the merges read and the files that stay, merge what kept backups need into them (each
    through a checked copy renamed into place), then update the index, then delete the removed files. Killed at any
    point, every backup the index lists stays restorable."""
    index = t.cast("dict[str, t.Any]", target.index)
    by_id = {entry["id"]: entry for entry in B.backups_of(index)}
    removed_files = [by_id[backup_id]["file"] for backup_id in plan.remove]
    check_merged_backups(qemu_img, target, plan)
    # The rebased backups were just checked against their recorded parents; the merge gives them new ones.
    rebased = {child_id for child_id, dummy in plan.rebase}
    unchanged = [by_id[backup_id]["file"] for backup_id in plan.kept if backup_id not in rebased]
    refuse_deleting_used_files(qemu_img, target, removed_files, unchanged, "Nothing was pruned or merged.", False)
    for child_id, new_parent in plan.rebase:
        entry = by_id[child_id]
        path = target.file(entry["file"])
        temp = target.file(f"{B.TMP_PREFIX}merge-{child_id}.qcow2")
        copy_fd = create_exclusive(temp)  # a file planted there is refused, and left alone
        try:
            with os.fdopen(copy_fd, "wb") as copy, open(path, "rb") as source:
                shutil.copyfileobj(source, copy)
            new_backing = by_id[new_parent]["file"] if new_parent else ""
            args = ["rebase", "-q", "-f", "qcow2", "-b", new_backing] + (["-F", "qcow2"] if new_parent else [])
            qemu_img.run(args + ["--", temp])
            if not qemu_img.compare(path, temp):
                raise B.BackupError(
                    f"Set {target.set_name}: merging the pruned backups into {child_id} changed what it shows; "
                    "nothing was deleted."
                )
            digest, defined = layer_digest(qemu_img, temp, target.folder)
            fsync_file(temp)
            os.rename(temp, path)
            fsync_folder(target.folder)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        entry["parent"] = new_parent
        if new_parent is None:
            entry["mode"] = "full"
        entry["sha256"] = digest
        entry["changed_bytes"] = defined
        entry["size"] = os.stat(path).st_size
        B.write_index(target.index_path, index)
    if plan.rebase:
        staying = [by_id[backup_id]["file"] for backup_id in plan.kept]
        refuse_deleting_used_files(
            qemu_img, target, removed_files, staying, "The merges done are recorded; nothing was deleted.", True
        )
    B.apply_prune(index, plan)
    B.write_index(target.index_path, index)
    for name in removed_files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target.file(name))
    fsync_folder(target.folder)


# ---------------------------------------------------------------------------------------------------------------
# The task


@dataclass
class Request:
    state: str
    dest_dir: str
    path: str | None = None
    socket: str | None = None
    devices: list[str] | None = None
    set_name: str | None = None
    mode: str = "auto"
    compress: bool = False
    verify: bool = True
    skip_unchanged: bool = True
    on_broken_chain: str = "full"
    backup_id: str | None = None
    restore_to: str | None = None
    restore_as: str = "standalone"
    force: bool = False
    retention: dict[str, t.Any] | None = None
    timeout: float = 3600.0
    connect_timeout: float = 5.0
    lock_timeout: float = 60.0

    @classmethod
    def from_params(cls, params: t.Mapping[str, t.Any]) -> Request:
        names = cls.__dataclass_fields__  # pylint: disable=no-member
        return cls(**{key: params[key] for key in names if key in params and params[key] is not None})


def validate_request(req: Request) -> PeriodRules | None:
    B.check_dest_dir(req.dest_dir)
    if req.path is not None and req.socket is not None:
        raise ValidationError("path and socket are mutually exclusive.")
    if req.set_name is not None:
        B.validate_set_name(req.set_name)
    if req.state == "present" and req.path is None and req.socket is None:
        raise ValidationError("state=present needs the disk: path (an offline image) or socket (a running VM).")
    if req.state != "present" and req.path is None and req.socket is None and req.set_name is None:
        raise ValidationError(f"state={req.state} needs the set: set_name, or the disk (path or socket).")
    if req.devices is not None and req.socket is None:
        raise ValidationError("devices applies to a running VM (socket).")
    if req.socket is not None:
        validate_image_path(req.socket, must_exist=False, what="Socket")
    if req.path is not None:
        validate_image_path(req.path)
    if req.backup_id is not None:
        if req.state not in ("restored", "verified"):
            raise ValidationError(f"backup_id applies to state=restored and state=verified, not state={req.state}.")
        B.validate_backup_id(req.backup_id)
    if req.state == "restored":
        if req.restore_to is None:
            raise ValidationError("state=restored needs restore_to.")
        check_restore_to(req.restore_to)
    elif req.restore_to is not None:
        raise ValidationError("restore_to applies to state=restored only.")
    if req.retention is not None and req.state not in ("present", "pruned"):
        raise ValidationError(f"retention applies to state=present and state=pruned, not state={req.state}.")
    rules = PeriodRules.from_params(_given(req.retention))
    if req.state == "pruned" and rules is None:
        raise ValidationError("state=pruned needs retention (keep, keep_daily, keep_weekly, keep_monthly, max_age).")
    if req.timeout <= 0 or req.connect_timeout <= 0:
        raise ValidationError("timeout and connect_timeout must be greater than zero.")
    return rules


def _given(retention: dict[str, t.Any] | None) -> dict[str, t.Any] | None:
    if retention is None:
        return None
    return {key: value for key, value in retention.items() if value is not None}


class Task:
    """One run of qcow2_backup."""

    def __init__(
        self,
        qemu_img: QemuImg,
        req: Request,
        check_mode: bool,
        warn: Warn,
        now: t.Callable[[], float],
        daemon: str | None = None,
    ) -> None:
        self.qemu_img = qemu_img
        self.daemon = daemon
        self.req = req
        self.check_mode = check_mode
        self.warn = warn
        self.now = now
        self.rules: PeriodRules | None = None
        self.targets: list[Target] = []
        self.qmp: QmpClient | None = None
        self.changed = False
        self.recorded: list[str] = []  # "<set>/<id>" of the backups this run wrote and recorded
        self.result: dict[str, t.Any] = {}

    # -- discovery --------------------------------------------------------------------------------------------

    def run(self) -> dict[str, t.Any]:
        try:
            return self._run()
        except VmsnapError as exc:
            if self.recorded:  # e.g. the prune after the backup failed: the backups taken are there all the same
                exc.details["changed"] = True
                exc.details["backups_recorded"] = list(self.recorded)
                exc.msg += f" (Recorded before the failure: {', '.join(self.recorded)}.)"
            raise

    def _run(self) -> dict[str, t.Any]:
        self.rules = validate_request(self.req)
        if self.req.socket is not None:
            from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient

            with QmpClient(
                self.req.socket,
                self.req.connect_timeout,
                max(self.req.connect_timeout, 30.0),
                lock_timeout=self.req.lock_timeout,
            ) as qmp:
                self.qmp = qmp
                if not self.check_mode and self.req.state == "present":
                    # Before the disks are read: a killed run's job keeps its copy-before-write filter on the disk.
                    for job_id in E.cancel_stale_jobs(qmp, E.leftover_job_ids(qmp)):
                        self.warn(f"Cancelled the leftover backup job {job_id} of an interrupted earlier run.")
                        self.changed = True
                self.targets = targets_from_vm(qmp, self.req.devices, self.req.dest_dir, self.req.set_name)
                return self._locked_run()
        if self.req.path is not None:
            target, info = target_from_image(self.qemu_img, self.req.path, self.req.dest_dir, self.req.set_name)
            if info.in_use and self.req.state in ("present", "pruned"):
                raise ImageInUseError(
                    f"Image {self.req.path} is in use by a running QEMU (its image locks forbid writing it): back "
                    "it up through the VM's QMP socket instead (socket, and devices to choose disks). Nothing was "
                    "changed.",
                    image_path=self.req.path,
                )
            if info.top.format != "qcow2" and self.req.state == "present":
                raise ValidationError(
                    f"Image {self.req.path} is {info.top.format}, not qcow2: incremental backups need a persistent "
                    "dirty bitmap, which only qcow2 stores."
                )
            self.targets = [target]
        else:
            self.targets = [target_from_set(self.req.dest_dir, t.cast(str, self.req.set_name))]
        return self._locked_run()

    def _lock_paths(self) -> list[str]:
        paths = [target.index_path for target in self.targets]
        paths += [target.image for target in self.targets if target.image]
        # A running VM's disks too: two runs into different dest_dirs would otherwise take their sets' job ids and
        # target nodes (named after the set) for a killed run's leftovers and cancel each other's jobs.
        paths += [target.source for target in self.targets if target.image is None and target.source]
        if self.req.restore_to:
            paths.append(self.req.restore_to)
        return paths

    def _locked_run(self) -> dict[str, t.Any]:
        if self.check_mode:
            return self._dispatch()
        with image_locks(self._lock_paths(), timeout=self.req.lock_timeout):
            return self._dispatch()

    def _dispatch(self) -> dict[str, t.Any]:
        for target in self.targets:
            load_set(target)
        handler = {
            "present": self._present,
            "verified": self._verified,
            "restored": self._restored,
            "pruned": self._pruned,
        }[self.req.state]
        handler()
        return self._result()

    # -- present ------------------------------------------------------------------------------------------------

    def _present(self) -> None:
        req = self.req
        live = self.qmp is not None
        if live:
            states = {target.node: E.bitmaps_of(self.qmp, target.node) for target in self.targets}
            for target in self.targets:
                target.bitmaps = {
                    name: B.BitmapView(name, bool(state.recording), bool(state.inconsistent), int(state.count))
                    for name, state in states[target.node].items()
                }
        for target in self.targets:
            if live:

                def counted(name: str, target: Target = target) -> int | None:
                    view = target.bitmaps.get(name)
                    return None if view is None else view.count

                reader: t.Callable[[str], int | None] = counted
            else:
                reader = offline_dirty_bytes(t.cast(str, target.image), req.connect_timeout, self.daemon)
            plan_present(target, req.mode, req.on_broken_chain, req.skip_unchanged, reader)
        jobs = []
        now = self.now()
        # One id for every disk of this run: the disks of a VM are backed up at one instant.
        backup_id = B.new_backup_id(now, set().union(*(taken_ids(target) for target in self.targets)))
        for target in self.targets:
            decision = t.cast(B.Decision, target.decision)
            if decision.warning:
                self.warn(decision.warning)
            target.cleaned = cleanup_leftovers(target, check_mode=True)
            if target.cleaned or target.stale_bitmaps or (target.index or {}).get("pending"):
                self.changed = True
            if decision.action != "none":
                jobs.append(new_job(target, backup_id, now))
                self.changed = True
            else:
                target.backup = B.public_backup(B.newest(target.index), target.folder)
        self._check_space(jobs)
        if self.check_mode:
            for job in jobs:
                job.target.backup = predicted_backup(job)
            self._prune_after_present(predict_ids={job.target.set_name: job for job in jobs})
            return
        for target in self.targets:
            ensure_folder(target)
            cleanup_leftovers(target, check_mode=False)
            if target.index is None:
                source, size = t.cast(str, target.source), t.cast(int, target.virtual_size)
                target.index = B.new_index(target.set_name, source, size)
        if live:
            self._cancel_stale_jobs()
        # Drop stale bitmaps first (a killed full's, an old chain's): they are this set's and nothing needs them.
        for target in self.targets:
            if target.stale_bitmaps:
                drop_bitmaps(target, target.stale_bitmaps, self.qemu_img, self.qmp)
        for job in jobs:
            job.target.old_bitmap = (job.target.index or {}).get("bitmap")
            if job.mode == "full":
                index = t.cast("dict[str, t.Any]", job.target.index)
                B.remember_chain(index, job.chain)
                B.write_index(job.target.index_path, index)
        entries: list[dict[str, t.Any]]
        if not jobs:
            entries = []
        elif live:
            entries = live_backups(self.qemu_img, t.cast("QmpClient", self.qmp), jobs, req.compress, req.timeout)
            self.recorded += [f"{job.target.set_name}/{entry['id']}" for job, entry in zip(jobs, entries)]
        else:
            entries = []
            for job in jobs:
                if job.mode == "full":
                    entries.append(offline_full(self.qemu_img, job, req.compress, req.verify))
                else:
                    entries.append(
                        offline_incremental(
                            self.qemu_img, job, req.compress, req.verify, req.timeout, req.connect_timeout, self.daemon
                        )
                    )
                self.recorded.append(f"{job.target.set_name}/{entries[-1]['id']}")
        for job, entry in zip(jobs, entries):
            target = job.target
            target.backup = B.public_backup(entry, target.folder)
            if job.mode == "full" and target.old_bitmap and target.old_bitmap != job.bitmap:
                try:
                    drop_bitmaps(target, [target.old_bitmap], self.qemu_img, self.qmp)
                except VmsnapError as exc:
                    self.warn(f"Set {target.set_name}: could not remove the old chain's bitmap: {exc.msg}")
        self._prune_after_present(predict_ids={})

    def _cancel_stale_jobs(self) -> None:
        ids = [f"vmsnap-backup-{target.set_name}" for target in self.targets]
        cancelled = E.cancel_stale_jobs(self.qmp, ids)
        for job_id in cancelled:
            self.warn(f"Cancelled the leftover backup job {job_id} of an interrupted earlier run.")

    def _check_space(self, jobs: list[Job]) -> None:
        needs: dict[str, int] = {}
        for job in jobs:
            target = job.target
            folder = target.folder if os.path.isdir(target.folder) else os.path.dirname(target.folder)
            if job.mode == "full":
                source = t.cast(str, target.image) if target.image else self._live_file(target)
                needed = measure_required(self.qemu_img, source, force_share=target.image is None)
            else:
                dirty = target.dirty_bytes
                if dirty is None:
                    view = target.bitmaps.get(job.bitmap)
                    dirty = view.count if view is not None and view.count is not None else None
                if dirty is None:
                    read = offline_dirty_bytes(t.cast(str, target.image), self.req.connect_timeout, self.daemon)
                    dirty = read(job.bitmap) or 0
                    target.dirty_bytes = dirty
                vsize = int(t.cast(int, target.virtual_size))
                needed = dirty + vsize // 8192 + 1024 * 1024
            if self.req.compress:
                needed *= 2  # the checksum decompresses compressed clusters into a sparse scratch file
            needs[folder] = needs.get(folder, 0) + needed
        if needs:
            refuse_without_space(needs, "the backup")

    def _live_file(self, target: Target) -> str:
        qmp = t.cast("QmpClient", self.qmp)
        for entry in qmp.execute("query-block") or []:
            inserted = entry.get("inserted") or {}
            if inserted.get("node-name") == target.node:
                return str(inserted.get("file"))
        raise B.BackupError(f"The disk {target.label} disappeared from the VM.")

    def _prune_after_present(self, predict_ids: dict[str, Job]) -> None:
        if self.rules is None:
            return
        for target in self.targets:
            index = target.index
            if self.check_mode and target.set_name in predict_ids:
                job = predict_ids[target.set_name]
                index = json.loads(json.dumps(index)) if index else B.new_index(target.set_name, "", 0)
                index["backups"].append(
                    {
                        "id": job.backup_id,
                        "epoch": job.epoch,
                        "parent": job.parent["id"] if job.parent else None,
                        "file": B.backup_file_name(job.backup_id, job.mode),
                        "mode": job.mode,
                    }
                )
            plan = B.plan_prune(index, self.rules, self.now())
            target.prune_plan = plan
            target.pruned = list(plan.remove)
            if plan.changed:
                self.changed = True
                if not self.check_mode:
                    execute_prune(self.qemu_img, target, plan)

    # -- verified -----------------------------------------------------------------------------------------------

    def _verified(self) -> None:
        failures = []
        for target in self.targets:
            index = require_index(target)
            if index.get("pending"):
                self.warn(f"Set {target.set_name}: {B.pending_note(index)}; the next backup will be a full one.")
            entries = (
                B.chain_to(index, B.find_backup(index, self.req.backup_id, target.set_name)["id"])
                if self.req.backup_id
                else B.backups_of(index)
            )
            results = []
            for entry in entries:
                problems = verify_backup(self.qemu_img, target, entry)
                results.append(
                    {"id": entry["id"], "file": target.file(entry["file"]), "ok": not problems, "problems": problems}
                )
                if problems:
                    failures.append(f"{target.set_name}/{entry['id']}: {'; '.join(problems)}")
            target.verified = results
        if failures:
            raise B.BackupError(
                "Verification failed: " + " | ".join(failures), sets=[self._set_result(tg) for tg in self.targets]
            )

    # -- restored -----------------------------------------------------------------------------------------------

    def _restored(self) -> None:
        if len(self.targets) != 1:
            raise ValidationError("state=restored restores one disk: choose it with devices (or use path/set_name).")
        target = self.targets[0]
        index = require_index(target)
        entry = B.find_backup(index, self.req.backup_id, target.set_name) if self.req.backup_id else B.newest(index)
        entry = t.cast("dict[str, t.Any]", entry)
        restore_to = t.cast(str, self.req.restore_to)
        backup_file = target.file(entry["file"])
        chain = B.chain_to(index, entry["id"])
        missing = [e["file"] for e in chain if not os.path.isfile(target.file(e["file"]))]
        if missing:
            raise B.BackupError(f"Set {target.set_name}: backup {entry['id']} needs {', '.join(missing)}, missing.")
        if os.path.realpath(restore_to) in {os.path.realpath(target.file(e["file"])) for e in B.backups_of(index)}:
            raise ValidationError("restore_to is a file of the backup set itself.")
        if target.source and os.path.realpath(restore_to) == target.source and self.qmp is not None:
            raise ValidationError("restore_to is the running VM's own disk; stop the VM first.")
        leftovers = stale_restore_temps(restore_to)
        exists = os.path.lexists(restore_to)
        needed = True
        if exists:
            locks = probe_qemu_locks(restore_to)
            if locks is not None and locks.blocks_writes:
                raise ImageInUseError(
                    f"restore_to {restore_to} is in use by a running QEMU; stop the VM first. Nothing was changed.",
                    image_path=restore_to,
                )
            if restored_matches(self.qemu_img, restore_to, backup_file, self.req.restore_as):
                needed = False
            elif not self.req.force:
                raise ValidationError(
                    f"restore_to {restore_to} exists (and does not hold backup {entry['id']}); it is not overwritten "
                    "unless force=true. Nothing was changed.",
                    restore_to=restore_to,
                )
        self.result["restored"] = {
            "id": entry["id"],
            "file": backup_file,
            "path": restore_to,
            "restore_as": self.req.restore_as,
            "chain": [target.file(e["file"]) for e in chain],
        }
        target.backup = B.public_backup(entry, target.folder)
        if not needed and not leftovers:
            return
        self.changed = True
        if self.check_mode:
            return
        for leftover in leftovers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        if not needed:
            return
        if self.req.verify:
            bad = {e["id"]: verify_backup(self.qemu_img, target, e) for e in chain}
            bad = {key: value for key, value in bad.items() if value}
            if bad:
                raise B.BackupError(
                    f"Set {target.set_name}: backup {entry['id']} cannot be restored, its chain fails verification: "
                    + "; ".join(f"{key}: {', '.join(value)}" for key, value in bad.items())
                    + ". Nothing was written."
                )
        if self.req.restore_as == "standalone":
            needed_bytes = measure_required(self.qemu_img, backup_file, force_share=False)
            refuse_without_space({os.path.dirname(restore_to): needed_bytes}, f"restoring {entry['id']}")
        restore(self.qemu_img, backup_file, restore_to, self.req.restore_as, self.req.verify)

    # -- pruned -------------------------------------------------------------------------------------------------

    def _pruned(self) -> None:
        for target in self.targets:
            if target.index is None:
                target.pruned = []
                continue
            target.cleaned = cleanup_leftovers(target, check_mode=True)
            plan = B.plan_prune(target.index, self.rules, self.now())
            target.prune_plan = plan
            target.pruned = list(plan.remove)
            if target.image is not None or target.node is not None:
                keep = {target.index["bitmap"]} if target.index.get("bitmap") else set()
                if target.node is not None:
                    state = E.bitmaps_of(self.qmp, target.node)
                    target.bitmaps = {name: B.BitmapView(name, True, False) for name in state}
                target.stale_bitmaps = B.own_stale_bitmaps(
                    target.set_name, target.bitmaps, keep, B.known_chains(target.index)
                )
            if plan.changed or target.cleaned or target.stale_bitmaps:
                self.changed = True
            if self.check_mode:
                continue
            cleanup_leftovers(target, check_mode=False)
            if target.stale_bitmaps:
                drop_bitmaps(target, target.stale_bitmaps, self.qemu_img, self.qmp)
            if plan.changed:
                execute_prune(self.qemu_img, target, plan)
            target.backup = B.public_backup(B.newest(target.index), target.folder)

    # -- result -------------------------------------------------------------------------------------------------

    def _set_result(self, target: Target) -> dict[str, t.Any]:
        index = target.index
        kept = [entry["id"] for entry in B.backups_of(index)]
        if target.prune_plan is not None:
            kept = target.prune_plan.kept
        result = {
            "set": target.set_name,
            "dest": target.folder,
            "index": target.index_path,
            "source": target.source or (index or {}).get("source"),
            "backup": target.backup,
            "bitmap": (index or {}).get("bitmap"),
            "pruned": target.pruned,
            "kept": kept,
            "cleaned": target.cleaned,
            "removed_bitmaps": target.stale_bitmaps,
            "full_reason": target.decision.full_reason
            if target.decision and target.decision.action == "full"
            else None,
        }
        if target.verified is not None:
            result["verified"] = target.verified
        return result

    def backups_after(self, target: Target) -> list[str]:
        ids = [entry["id"] for entry in B.backups_of(target.index)]
        if self.check_mode and target.backup and target.backup.get("id") not in ids and self.req.state == "present":
            ids.append(target.backup["id"])
        if target.prune_plan is not None:
            ids = [backup_id for backup_id in ids if backup_id not in target.prune_plan.remove]
        return ids

    def _result(self) -> dict[str, t.Any]:
        sets = [self._set_result(target) for target in self.targets]
        result: dict[str, t.Any] = dict(changed=self.changed, sets=sets)
        if len(sets) == 1:
            result["backup"] = sets[0]["backup"]
        if self.req.state == "verified":
            result["verified"] = [item for s in sets for item in s.get("verified", [])]
        result.update(self.result)
        result["diff"] = {
            "before": {target.set_name: target.before for target in self.targets},
            "after": {target.set_name: self.backups_after(target) for target in self.targets},
        }
        return result


def run_task(
    qemu_img: QemuImg,
    params: t.Mapping[str, t.Any],
    check_mode: bool,
    warn: Warn,
    now: t.Callable[[], float] = time.time,
    daemon: str | None = None,
) -> dict[str, t.Any]:
    """Everything qcow2_backup does. daemon: the qemu-storage-daemon binary (None: looked up on PATH)."""
    return Task(qemu_img, Request.from_params(params), check_mode, warn, now, daemon).run()
