# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Checks before a checkpoint (checkpoint_preflight): which method, and every reason not to take one now.

Everything here only reads: QMP queries, qemu-img info, /proc and statvfs. The decisions are pure functions
over what was read, so that they can be tested without a VM.
"""

from __future__ import annotations

import os
import stat
import typing as t
from dataclasses import dataclass, field

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._guest_agent import GuestAgentClient, GuestFreezer
from ansible_collections.vmsnap.qemu.plugins.module_utils._live import LivePlan, LiveRequest, plan_live
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient, QmpConnectionError, QmpTimeoutError
from ansible_collections.vmsnap.qemu.plugins.module_utils._revert_bitmaps import backup_sets, blocking_bitmaps
from ansible_collections.vmsnap.qemu.plugins.module_utils._stale_jobs import orphaned_owner
from ansible_collections.vmsnap.qemu.plugins.module_utils._vm import describe_vm
from ansible_collections.vmsnap.qemu.plugins.module_utils._vmstate import read_vm_facts, reserve_bytes

if t.TYPE_CHECKING:
    from ansible_collections.vmsnap.qemu.plugins.module_utils._image import ImageInfo

LIVE_STATUSES = ("running", "paused")
# snapshot-save (internal with RAM) and background-snapshot (external with RAM) both arrived in QEMU 6.0.
RAM_CHECKPOINTS_SINCE = (6, 0, 0)
FREEZE_TIMEOUT = 60.0  # a freeze waits for the guest to write out its dirty pages
METHOD_TEXT = {
    "internal": "internal checkpoint with RAM",
    "external": "external checkpoint with RAM",
    "offline": "offline checkpoint (internal snapshots of the stopped VM's disks, no RAM)",
}


class PreflightRefusal(VmsnapError):
    """A checkpoint must not be taken now. The message starts with "VM <vm>: "; reason is a short code."""

    def __init__(self, vm: str, reason: str, text: str, **details: t.Any) -> None:
        super().__init__(f"VM {vm}: {text}", reason=reason, **details)
        self.reason = reason


@dataclass(frozen=True)
class PreflightRequest:
    vm: str
    name: str
    method: str = "auto"
    can_restart: bool = False
    overlay_dir: str | None = None
    max_snapshots: int = 20
    warn_snapshots: int = 10
    growth_reserve_percent: int = 5
    quiesce: str = "off"


@dataclass
class Disk:
    """One disk of the checkpoint as this module reports it."""

    file: str
    format: str
    virtual_size: int
    snapshot_names: tuple[str, ...] = ()
    chain_files: tuple[str, ...] = ()  # top first; the image itself included
    device: str | None = None
    node_name: str | None = None
    qdev: str | None = None
    writable: bool = True
    bitmaps: tuple[str, ...] = ()
    overlay: str | None = None  # external: the overlay file the checkpoint uses
    taken: bool = False  # the checkpoint of this name is on this disk already

    @property
    def chain_depth(self) -> int:
        return max(len(self.chain_files) - 1, 0)

    def result(self) -> dict[str, t.Any]:
        return {
            "file": self.file,
            "format": self.format,
            "device": self.device,
            "node_name": self.node_name,
            "qdev": self.qdev,
            "virtual_size": self.virtual_size,
            "snapshots": len(self.snapshot_names),
            "chain_depth": self.chain_depth,
            "overlay": self.overlay,
        }


def disk_from_qmp(disk: dict[str, t.Any]) -> Disk:
    """From one describe_vm() block device."""
    chain = disk.get("chain") or []
    return Disk(
        file=str(disk.get("file")),
        format=str(disk.get("format")),
        virtual_size=int(chain[0]["virtual_size"]) if chain else 0,
        snapshot_names=tuple(str(snap["name"]) for snap in disk.get("snapshots") or []),
        chain_files=tuple(str(layer["filename"]) for layer in chain) or (str(disk.get("file")),),
        device=disk.get("device") or None,
        node_name=disk.get("node_name"),
        qdev=disk.get("qdev"),
        writable=bool(disk.get("writable")),
        bitmaps=tuple(str(bitmap.get("name") or "(unnamed)") for bitmap in disk.get("bitmaps") or []),
    )


def disk_from_image(path: str, info: ImageInfo) -> Disk:
    top = info.top
    return Disk(
        file=path,
        format=top.format,
        virtual_size=top.virtual_size,
        snapshot_names=tuple(snap.name for snap in top.snapshots),
        chain_files=tuple(info.filenames()),
        bitmaps=tuple(bitmap.name for bitmap in top.bitmaps),
    )


@dataclass
class VmView:
    """What was read about the VM: over QMP when it runs, from its image files when it is stopped."""

    running: bool
    status: str
    disks: list[Disk]
    qemu_version: str | None = None
    version: tuple[int, int, int] | None = None
    ram_size: int | None = None
    pid: int | None = None
    jobs: list[dict[str, t.Any]] = field(default_factory=list)
    described: dict[str, t.Any] | None = None  # describe_vm() of a running VM


@dataclass
class Preflight:
    request: PreflightRequest
    view: VmView
    method: str
    state_file: str | None = None
    vmstate_disk: str | None = None
    exists: bool = False  # every disk holds the checkpoint already (a re-run)
    warnings: list[str] = field(default_factory=list)

    def message(self) -> str:
        count = len(self.view.disks)
        disks = f"{count} disk" + ("" if count == 1 else "s")
        again = "; it exists already" if self.exists else ""
        return f"VM {self.request.vm} can be checkpointed: {METHOD_TEXT[self.method]}, {disks}{again}"


# --- 1. reading the VM ----------------------------------------------------------------------------------------------


def connect(vm: str, socket_path: str | None, timeout: float) -> QmpClient | None:
    """A connected client, or None when there is no socket or nothing answers on it (the VM is stopped).

    A monitor that accepts but stays silent is a refusal: QEMU may be alive (hung, or busy with another client),
    and then its disks must not be treated as those of a stopped VM.
    """
    if socket_path is None or not os.path.lexists(socket_path):
        return None
    try:
        mode = os.stat(socket_path).st_mode
    except OSError as exc:
        raise PreflightRefusal(
            vm, "socket", f"{socket_path} cannot be read ({exc.strerror or exc}); give the VM's QMP socket."
        ) from None
    if not stat.S_ISSOCK(mode):
        raise PreflightRefusal(vm, "socket", f"{socket_path} is not a socket; give the VM's QMP socket.")
    qmp = QmpClient(socket_path, connect_timeout=timeout, command_timeout=max(timeout, 30.0))
    try:
        qmp.connect()
    except QmpTimeoutError:
        qmp.close()
        raise PreflightRefusal(
            vm,
            "socket",
            f"its QMP socket {socket_path} accepts connections but QEMU does not answer within {timeout:g} s "
            "(hung, or another client holds the monitor); it can be checkpointed neither live nor offline.",
            socket=socket_path,
        ) from None
    except QmpConnectionError:
        qmp.close()
        return None
    return qmp


def read_running(qmp: QmpClient) -> VmView:
    described = describe_vm(qmp)
    facts = read_vm_facts(qmp, described)
    return VmView(
        running=True,
        status=str(described.get("status")),
        disks=[disk_from_qmp(disk) for disk in described["block_devices"] if disk.get("writable")],
        qemu_version=described.get("qemu_version"),
        version=qmp.version,
        ram_size=facts.ram_size,
        pid=qmp.peer_pid(),
        jobs=list(described.get("jobs") or []),
        described=described,
    )


def stopped_view(disks: list[Disk]) -> VmView:
    return VmView(running=False, status="stopped", disks=disks)


def refuse_unreachable(vm: str, socket_path: str | None) -> t.NoReturn:
    if socket_path is None:
        raise PreflightRefusal(
            vm,
            "socket",
            "neither its QMP socket nor vmsnap_disks is set, so it can be checkpointed neither live nor offline.",
        )
    raise PreflightRefusal(
        vm,
        "socket",
        f"its QMP socket {socket_path} does not answer and vmsnap_disks is not set, so it can be checkpointed "
        "neither live nor offline.",
        socket=socket_path,
    )


# --- 2. status and jobs -----------------------------------------------------------------------------------------


def refuse_status(vm: str, status: str) -> None:
    if status not in LIVE_STATUSES:
        raise PreflightRefusal(
            vm,
            "status",
            f"it is in status {status!r}; a checkpoint needs it running or paused (find out why it is {status} "
            "first; a VM started with -S that never ran is 'prelaunch').",
            vm_status=status,
        )


def refuse_jobs(vm: str, jobs: list[dict[str, t.Any]]) -> None:
    """Jobs of a killed qmp_live_snapshot task are not refused: the checkpoint's own task finishes them first."""
    for job in jobs:
        if job.get("status") not in ("concluded", "null") and orphaned_owner(job.get("id")) is None:
            raise PreflightRefusal(
                vm,
                "job",
                f"QEMU is running the {job.get('type')} job {job.get('id')!r} (status {job.get('status')}); "
                "wait for it to finish, or cancel it, before taking a checkpoint.",
                job_id=job.get("id"),
            )


# --- 3. method ------------------------------------------------------------------------------------------------------


def decide_method(vm: str, requested: str, running: bool, can_restart: bool) -> str:
    """The method to use; a refusal when the requested one does not fit the VM."""
    if running:
        method = ("external" if can_restart else "internal") if requested == "auto" else requested
        if method == "offline":
            raise PreflightRefusal(vm, "method", "it is running; an offline checkpoint needs it stopped.")
        if method == "external" and not can_restart:
            raise PreflightRefusal(
                vm,
                "method",
                "rolling back an external checkpoint with RAM restarts QEMU: set vmsnap_vm_start (or use the "
                "internal method).",
            )
        return method
    if requested in ("auto", "offline"):
        return "offline"
    raise PreflightRefusal(
        vm,
        "method",
        f"it is stopped; an {requested} checkpoint saves RAM and needs it running (use method auto or offline).",
    )


def refuse_old_qemu(vm: str, method: str, version: tuple[int, int, int] | None) -> None:
    if method in ("internal", "external") and version is not None and version < RAM_CHECKPOINTS_SINCE:
        raise PreflightRefusal(
            vm,
            "version",
            f"it runs QEMU {'.'.join(map(str, version))}; an {method} checkpoint with RAM needs QEMU 6.0 or later.",
        )


# --- 4. disks -------------------------------------------------------------------------------------------------------


def refuse_formats(vm: str, method: str, disks: list[Disk]) -> None:
    if not disks:
        raise PreflightRefusal(vm, "disks", "it has no writable disk to checkpoint.")
    if method == "external":
        return  # the overlays are qcow2 whatever lies below them
    for disk in disks:
        if disk.format != "qcow2":
            what = "an internal checkpoint" if method == "internal" else "an offline checkpoint"
            hint = " (the external method works on any format: set vmsnap_vm_start)" if method == "internal" else ""
            raise PreflightRefusal(
                vm,
                "format",
                f"disk {disk.file} is {disk.format}; {what} needs every writable disk in qcow2{hint}.",
                disk=disk.file,
            )


def refuse_in_use(vm: str, path: str, info: ImageInfo) -> None:
    if info.in_use:
        raise PreflightRefusal(vm, "held", f"{path} is in use by another process (a running QEMU?).", disk=path)


def plan_running(request: PreflightRequest, view: VmView, method: str) -> Preflight:
    """Ask the live snapshot planner what qmp_live_snapshot would do, so that it will not refuse later."""
    preflight = Preflight(request=request, view=view, method=method)
    live = LiveRequest(name=request.name, mode=method, vmstate=True, overlay_dir=request.overlay_dir)
    try:
        plan: LivePlan = plan_live(live, t.cast("dict[str, t.Any]", view.described), t.cast(tuple, view.version))
    except ValidationError as exc:
        raise PreflightRefusal(request.vm, "plan", exc.msg, **exc.details) from None
    preflight.exists = not plan.changed
    for disk, device in zip(view.disks, plan.devices):
        disk.taken = device.has_snapshot
        disk.overlay = device.overlay if method == "external" else None
    if method == "external":
        preflight.state_file = plan.state_file
    else:
        preflight.vmstate_disk = view.disks[0].file
    return preflight


def plan_stopped(request: PreflightRequest, view: VmView) -> Preflight:
    preflight = Preflight(request=request, view=view, method="offline")
    for disk in view.disks:
        disk.taken = request.name in disk.snapshot_names
    preflight.exists = all(disk.taken for disk in view.disks)
    return preflight


def bitmap_warnings(preflight: Preflight) -> list[str]:
    """QEMU cannot roll back an internal snapshot while a disk has a dirty bitmap: say now what the rollback will do."""
    if preflight.method == "external":
        return []
    warnings = []
    for disk in preflight.view.disks:
        found = blocking_bitmaps((name, False) for name in disk.bitmaps)
        foreign = [str(bitmap.name) for bitmap in found if bitmap.backup_set is None]
        sets = backup_sets(found)
        if foreign:
            warnings.append(
                f"VM {preflight.request.vm}: disk {disk.file} has dirty bitmaps ({', '.join(foreign)}): QEMU refuses "
                "to roll back an internal snapshot while they exist, and they belong to another tool, which "
                "vmsnap.qemu never touches: a rollback to this checkpoint fails until their owner removes them."
            )
        if sets:
            warnings.append(
                f"VM {preflight.request.vm}: disk {disk.file} has the bitmap of backup set "
                f"{', '.join(map(repr, sets))} (vmsnap.qemu.qcow2_backup): a rollback to this checkpoint removes it "
                "first (the rollback role's vmsnap_rollback_backup_bitmaps, default drop), and the set's next "
                "backup is then a full one."
            )
    return warnings


# --- 5. other processes holding the images ---------------------------------------------------------------------------


def find_holders(
    paths: t.Iterable[str], exclude: t.Collection[int] = (), proc_root: str = "/proc"
) -> dict[str, list[tuple[int, str]]]:
    """{real path: [(pid, command name)]} of the processes that have one of paths open, in one pass over /proc.

    Entries that cannot be read (other users' processes, processes that ended meanwhile) are skipped.
    """
    wanted = {os.path.realpath(path) for path in paths}
    found: dict[str, list[tuple[int, str]]] = {}
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) in exclude:
            continue
        fd_dir = os.path.join(proc_root, entry, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        seen: set[str] = set()
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target in wanted and target not in seen:
                seen.add(target)
                found.setdefault(target, []).append((int(entry), _command_name(proc_root, entry)))
    return found


def _command_name(proc_root: str, pid: str) -> str:
    try:
        with open(os.path.join(proc_root, pid, "comm"), encoding="utf-8", errors="replace") as comm:
            return comm.read().strip() or "?"
    except OSError:
        return "?"


def files_to_scan(preflight: Preflight) -> list[str]:
    """The disks' files; for an offline checkpoint the whole chains (a stopped VM's backing files too)."""
    files: list[str] = []
    for disk in preflight.view.disks:
        for name in disk.chain_files if preflight.method == "offline" else (disk.file,):
            if name not in files:
                files.append(name)
    return files


def refuse_holders(vm: str, holders: dict[str, list[tuple[int, str]]]) -> None:
    if not holders:
        return
    listed = sorted(holders.items())
    described = "; ".join(
        f"{path} by " + ", ".join(f"pid {pid} ({comm})" for pid, comm in procs) for path, procs in listed
    )
    raise PreflightRefusal(
        vm,
        "held",
        f"its images are open in other processes: {described}. Stop them (a backup, a qemu-img or qemu-nbd?) "
        "before taking a checkpoint.",
        holders=[{"file": path, "pid": pid, "command": comm} for path, procs in listed for pid, comm in procs],
    )


# --- 6. snapshot count and chain depth ---------------------------------------------------------------------------


def count_after(disk: Disk, method: str) -> int:
    """Internal snapshots (internal, offline) or chain depth (external) once the checkpoint is taken."""
    if method == "external":
        return disk.chain_depth if disk.taken else disk.chain_depth + 1
    return len(disk.snapshot_names) + (0 if disk.taken else 1)


def check_counts(preflight: Preflight) -> list[str]:
    """Warnings for disks above warn_snapshots; a refusal for the first one above max_snapshots."""
    request, method = preflight.request, preflight.method
    what = "backing files (chain depth)" if method == "external" else "internal snapshots"
    warnings = []
    for disk in preflight.view.disks:
        count = count_after(disk, method)
        if count > request.max_snapshots:
            raise PreflightRefusal(
                request.vm,
                "snapshots",
                f"disk {disk.file} would have {count} {what} with this checkpoint, more than max_snapshots "
                f"({request.max_snapshots}); remove old checkpoints first.",
                disk=disk.file,
                count=count,
            )
        if count > request.warn_snapshots:
            warnings.append(
                f"VM {request.vm}: disk {disk.file} will have {count} {what} (more than {request.warn_snapshots}); "
                "each one slows the guest's writes. Remove old checkpoints."
            )
    return warnings


# --- 7. free space ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpaceNeed:
    folder: str
    ram_state: int = 0
    growth: int = 0


def space_needs(preflight: Preflight) -> list[SpaceNeed]:
    """Where the checkpoint grows: each disk's reserve and, with RAM, the state (the file or the vmstate disk)."""
    request, method = preflight.request, preflight.method
    needs = []
    for disk in preflight.view.disks:
        if disk.taken:
            continue
        grows_in = disk.overlay if method == "external" and disk.overlay else disk.file
        needs.append(
            SpaceNeed(os.path.dirname(grows_in), growth=disk.virtual_size * request.growth_reserve_percent // 100)
        )
    ram = preflight.view.ram_size
    if method != "offline" and ram and not preflight.exists:
        holder = preflight.state_file if method == "external" else preflight.vmstate_disk
        if holder:
            needs.append(SpaceNeed(os.path.dirname(holder), ram_state=reserve_bytes(ram)))
    return needs


def _device_of(folder: str) -> int:
    try:
        return os.stat(folder).st_dev
    except OSError as exc:
        raise VmsnapError(
            f"Cannot check the free space in {folder}: {exc.strerror or exc}. Nothing was changed.", folder=folder
        ) from None


def _free_bytes(folder: str) -> int:
    try:
        st = os.statvfs(folder)
    except OSError as exc:
        raise VmsnapError(
            f"Cannot check the free space in {folder}: {exc.strerror or exc}. Nothing was changed.", folder=folder
        ) from None
    return st.f_bavail * st.f_frsize


def sum_space(
    needs: list[SpaceNeed],
    device_of: t.Callable[[str], int] = _device_of,
    free_of: t.Callable[[str], int] = _free_bytes,
) -> list[dict[str, t.Any]]:
    """One entry per file system (st_dev), in the order first needed: path, dev, needed, free and the parts."""
    by_dev: dict[int, dict[str, t.Any]] = {}
    for need in needs:
        dev = device_of(need.folder)
        entry = by_dev.get(dev)
        if entry is None:
            entry = by_dev[dev] = {"path": need.folder, "dev": dev, "needed": 0, "ram_state": 0, "growth": 0}
            entry["free"] = free_of(need.folder)
        entry["ram_state"] += need.ram_state
        entry["growth"] += need.growth
        entry["needed"] += need.ram_state + need.growth
    return list(by_dev.values())


def refuse_short(vm: str, method: str, space: list[dict[str, t.Any]]) -> None:
    growth_name = "overlay growth" if method == "external" else "snapshot growth"
    for entry in space:
        if entry["needed"] <= entry["free"]:
            continue
        parts = []
        if entry["ram_state"]:
            parts.append(f"RAM state {human_size(entry['ram_state'])}")
        if entry["growth"]:
            parts.append(f"{growth_name} {human_size(entry['growth'])}")
        raise PreflightRefusal(
            vm,
            "space",
            f"not enough free space on the file system of {entry['path']}: the checkpoint needs "
            f"{human_size(entry['needed'])} ({', '.join(parts)}), {human_size(entry['free'])} are free.",
            space=space,
        )


def human_size(size: int) -> str:
    """1.4 GiB, 400 MiB, 12 KiB: one decimal below 100 units, none above."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    units = ["KiB", "MiB", "GiB", "TiB"]
    value /= 1024
    while value >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{value:.1f} {units[0]}" if value < 100 else f"{value:.0f} {units[0]}"


# --- 8. quiesce ---------------------------------------------------------------------------------------------------


def open_agent(preflight: Preflight, socket_path: str | None, timeout: float) -> GuestAgentClient | None:
    """The guest agent, connected, pinged and thawed, when quiesce asks for it; None otherwise.

    A missing or silent agent is a refusal for quiesce=required and a warning for best_effort. A stopped VM's
    disks are consistent as they are: no agent is asked.
    """
    request = preflight.request
    if request.quiesce == "off" or preflight.method == "offline":
        return None
    problem = "guest_agent_socket is not set"
    if socket_path is not None:
        agent = GuestAgentClient(socket_path, timeout, timeout)
        try:
            agent.connect()
            agent.execute("guest-ping")
            GuestFreezer(agent, timeout).probe()
            return agent
        except VmsnapError as exc:
            agent.close()
            problem = f"the guest agent at {socket_path} cannot flush the guest: {exc.msg}"
    if request.quiesce == "required":
        raise PreflightRefusal(
            request.vm, "quiesce", f"quiesce=required, but {problem}", guest_agent_socket=socket_path
        )
    preflight.warnings.append(
        f"VM {request.vm}: quiesce=best_effort, but {problem}; the checkpoint's disks are consistent only "
        "together with its RAM."
    )
    return None


def flush(preflight: Preflight, agent: GuestAgentClient) -> bool:
    """fs-freeze immediately followed by thaw: the guest writes out its dirty data. True when it was flushed.

    The RAM of the checkpoint holds the guest's page cache anyway; the flush makes its disks consistent on
    their own. The guest is always thawed, also after a failed freeze.
    """
    request = preflight.request
    freezer = GuestFreezer(agent, FREEZE_TIMEOUT)
    thaw_error: VmsnapError | None = None
    try:
        try:
            freezer.freeze()
        finally:
            try:
                freezer.thaw()
            except VmsnapError as exc:
                thaw_error = exc
    except VmsnapError as exc:
        if request.quiesce == "required" or exc.details.get("guest_may_be_frozen"):
            raise PreflightRefusal(
                request.vm, "quiesce", f"flushing the guest's file systems failed: {exc.msg}", **exc.details
            ) from None
        preflight.warnings.append(
            f"VM {request.vm}: quiesce=best_effort, but flushing the guest's file systems failed ({exc.msg})."
        )
        return False
    if thaw_error is not None:
        raise PreflightRefusal(
            request.vm,
            "quiesce",
            f"the guest's file systems were frozen to flush them, but thawing them failed: {thaw_error.msg} "
            "The guest may still be frozen; run guest-fsfreeze-thaw.",
            guest_may_be_frozen=True,
            changed=True,
        )
    return True
