# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Live snapshots of a running VM over QMP, the planning half: decide from what the VM reports.

plan_live() is pure: it takes describe_vm()'s view of the VM and decides, per chosen disk, what to do.
_live_execute.execute_live() then does it with one QMP client (and the guest agent for quiesce).
"""

from __future__ import annotations

import hashlib
import os
import typing as t
from dataclasses import dataclass, field

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._revert_bitmaps import (
    BlockingBitmap,
    blocking_bitmaps,
    check_revert_bitmaps,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._stale_jobs import is_unused_claim

SNAPSHOT_JOBS_SINCE = (6, 0, 0)
SAVEABLE_VM_STATUSES = ("running", "paused")
STATE_SIDECAR_SUFFIX = ".json"
MAX_FILE_NAME_BYTES = 255
# QEMU leaves these statuses only when someone acts; a snapshot now would capture or hide a broken state.
UNSAFE_VM_STATUSES = ("restore-vm", "inmigrate", "internal-error", "io-error", "guest-panicked", "shutdown")


class LiveSnapshotError(VmsnapError):
    """A QMP step of a live snapshot failed; details say what was done before."""


@dataclass(frozen=True)
class LiveRequest:
    name: str
    mode: str = "internal"
    state: str = "present"
    devices: tuple[str, ...] | None = None
    vmstate: bool | None = None
    overlay_dir: str | None = None
    quiesce: str = "off"
    guest_agent_socket: str | None = None
    timeout: float = 300.0
    backup_bitmaps: str = "fail"  # reverted: drop the disks' qcow2_backup bitmaps first, or refuse
    after: str = "unchanged"  # reverted: "running" resumes the guest after the load (also from prelaunch)

    def __post_init__(self) -> None:
        if self.vmstate is None:  # RAM by default for internal snapshots, disks only for external ones
            object.__setattr__(self, "vmstate", self.mode == "internal")

    @property
    def with_vmstate(self) -> bool:
        return bool(self.vmstate)


@dataclass
class DevicePlan:
    """One chosen disk: what the VM reports for it and what this task does to it."""

    label: str  # how the task names the disk: as given in devices, else its drive id or node name
    disk: dict[str, t.Any]
    has_snapshot: bool
    action: str = "none"  # create | delete | revert | merge | none
    overlay: str | None = None  # external: the overlay file of this snapshot
    overlay_index: int | None = None  # external: the overlay's position in the chain (0 = active layer)
    drop_bitmaps: list[BlockingBitmap] = field(default_factory=list)  # reverted: backup bitmaps removed first

    @property
    def node_name(self) -> str:
        return str(self.disk["node_name"])

    def result(self) -> dict[str, t.Any]:
        return {
            "name": self.label,
            "device": self.disk.get("device"),
            "node_name": self.disk.get("node_name"),
            "file": self.disk.get("file"),
            "action": self.action,
            "changed": self.action != "none",
            "overlay": self.overlay,
            "dropped_bitmaps": [bitmap.as_dict() for bitmap in self.drop_bitmaps],
        }


@dataclass
class LivePlan:
    request: LiveRequest
    devices: list[DevicePlan]
    vm_running: bool
    vm_status: str | None = None
    vmstate_node: str | None = None
    state_file: str | None = None  # external with vmstate: the RAM state file of the checkpoint
    state_file_action: str = "none"  # create | delete | none
    quiesce: bool = False  # freeze the guest file systems around the snapshot
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.state_file_action != "none" or any(device.action != "none" for device in self.devices)

    def acting(self) -> list[DevicePlan]:
        return [device for device in self.devices if device.action != "none"]

    def diff(self) -> dict[str, dict[str, t.Any]]:
        before: dict[str, t.Any] = {device.label: _view(self.request, device, after=False) for device in self.devices}
        after: dict[str, t.Any] = {device.label: _view(self.request, device, after=True) for device in self.devices}
        if self.state_file:
            exists = os.path.lexists(self.state_file)
            keeps = self.state_file_action == "create" or (self.state_file_action == "none" and exists)
            before["vmstate_file"] = self.state_file if exists else None
            after["vmstate_file"] = self.state_file if keeps else None
        return {"before": before, "after": after}


def disk_label(disk: dict[str, t.Any]) -> str:
    """Drive id, else the guest device's id, else the active node name (which changes with each overlay)."""
    return str(disk.get("device") or qdev_id(disk.get("qdev")) or disk.get("node_name") or disk.get("qdev"))


def qdev_id(qdev: str | None) -> str | None:
    """The id given with -device ... ,id=ID: QEMU reports /machine/peripheral/ID/virtio-backend or just ID."""
    if not qdev:
        return None
    if qdev.startswith("/machine/peripheral/"):
        return qdev.split("/")[3] or None
    if qdev.startswith("/"):
        return None  # an anonymous device (/machine/peripheral-anon/...)
    return qdev


OVERLAY_MARK = ".vmsnap-"


def disk_stem(disk_file: str) -> str:
    """A disk's file name without .qcow2 and without the marks of vmsnap overlays stacked on it."""
    stem = os.path.basename(disk_file)
    if stem.endswith(".qcow2"):
        stem = stem[: -len(".qcow2")]
    return stem.split(OVERLAY_MARK, 1)[0]


def overlay_path(disk_file: str, name: str, overlay_dir: str | None) -> str:
    """<dir>/<disk stem>.vmsnap-<name>.qcow2, beside the disk's active file unless overlay_dir is set.

    The stem comes from the disk, not from the overlays on it, so names stay short and an overlay is still
    recognised after the overlays below it were merged away.
    """
    folder = overlay_dir or os.path.dirname(disk_file)
    return os.path.join(folder, f"{disk_stem(disk_file)}{OVERLAY_MARK}{name}.qcow2")


def overlay_node_name(path: str) -> str:
    """QEMU needs a node name for the new overlay: deterministic, at most 31 characters."""
    return "vmsnap-" + hashlib.sha256(path.encode("utf-8")).hexdigest()[:20]


def find_overlay(chain: list[dict[str, t.Any]], name: str) -> int | None:
    """Index (0 = active layer) of the layer that is this snapshot's overlay, matched by file name."""
    for index in range(len(chain) - 1):
        expected = os.path.basename(overlay_path(chain[index + 1]["filename"], name, None))
        if os.path.basename(chain[index]["filename"]) == expected:
            return index
    return None


def choose_disks(
    block_devices: list[dict[str, t.Any]], wanted: tuple[str, ...] | None, nodes: list[dict[str, t.Any]] | None = None
) -> list[tuple[str, dict[str, t.Any]]]:
    """(label, disk) for the disks named by drive id, qdev id or node name; by default every writable disk.

    A node name also finds its disk after an external snapshot put an overlay (a new active node) on top of it.
    """
    if wanted is None:
        chosen = [disk for disk in block_devices if disk["writable"]]
        if not chosen:
            raise ValidationError("The VM has no writable disk to snapshot.", vm_disks=_inventory(block_devices))
        return [(disk_label(disk), disk) for disk in chosen]
    if not wanted:
        raise ValidationError("devices must name at least one disk; leave it out to choose every writable disk.")
    picked: list[tuple[str, dict[str, t.Any]]] = []
    for name in wanted:
        matches = [disk for disk in block_devices if name in _names_of(disk, nodes or [])]
        if not matches:
            raise ValidationError(
                f"Device {name!r} is not a disk of this VM. Its disks: {_inventory(block_devices)}.",
                device=name,
            )
        if any(matches[0] is disk for dummy, disk in picked):
            raise ValidationError(f"devices names the disk {disk_label(matches[0])} more than once.", device=name)
        picked.append((name, matches[0]))
    return picked


def _names_of(disk: dict[str, t.Any], nodes: list[dict[str, t.Any]]) -> set[t.Any]:
    layers = {(layer["filename"], layer["format"]) for layer in disk["chain"]}
    chain_nodes = {node.get("node-name") for node in nodes if (node.get("file"), node.get("drv")) in layers}
    own = {disk.get("device"), disk.get("node_name"), disk.get("qdev"), qdev_id(disk.get("qdev"))}
    return (own | chain_nodes) - {None, ""}


def _inventory(block_devices: list[dict[str, t.Any]]) -> str:
    return (
        ", ".join(
            f"{disk_label(disk)} (node {disk['node_name']}, {disk['format']}, "
            f"{'writable' if disk['writable'] else 'read-only'}, {disk['file']})"
            for disk in block_devices
        )
        or "none"
    )


def plan_live(
    request: LiveRequest,
    vm: dict[str, t.Any],
    version: tuple[int, int, int],
    nodes: list[dict[str, t.Any]] | None = None,
) -> LivePlan:
    """Decide per disk. vm is describe_vm()'s result, nodes query-named-block-nodes'. Touches nothing."""
    status = vm.get("status")
    if status in UNSAFE_VM_STATUSES and request.state != "absent":
        raise ValidationError(
            f"The VM is in status {status!r}; refusing to snapshot or revert it in that state. "
            "Find out why (a failed snapshot load leaves 'restore-vm') before you go on.",
            vm_status=status,
        )
    _refuse_running_vmsnap_jobs(vm.get("jobs") or [])
    disks = choose_disks(vm["block_devices"], request.devices, nodes)
    if request.state != "absent":
        for label, disk in disks:
            if not disk["writable"]:
                raise ValidationError(f"Disk {label} is read-only in the VM; there is nothing to snapshot.")
    plan = LivePlan(request=request, devices=[], vm_running=bool(vm.get("running")), vm_status=str(status))
    if request.mode == "internal":
        _plan_internal(plan, disks, version)
        if request.state == "reverted":
            _warn_disks_left_out(plan, vm["block_devices"])
    else:
        _plan_external(plan, disks)
        if plan.state_file_action == "create":
            _warn_disks_left_out(plan, vm["block_devices"])
    _plan_quiesce(plan)
    return plan


def _warn_disks_left_out(plan: LivePlan, block_devices: list[dict[str, t.Any]]) -> None:
    chosen = [device.disk for device in plan.devices]
    left_out = [disk_label(disk) for disk in block_devices if disk["writable"] and not any(disk is c for c in chosen)]
    if left_out:
        what = "revert brings back" if plan.request.state == "reverted" else "checkpoint saves"
        plan.warnings.append(
            f"The {what} RAM but leaves the writable disks {', '.join(left_out)} out. If the guest has file "
            "systems on them mounted, a restored page cache will no longer match them; include them in devices."
        )


def _refuse_running_vmsnap_jobs(jobs: list[dict[str, t.Any]]) -> None:
    for job in jobs:
        if str(job.get("id", "")).startswith("vmsnap-") and job.get("status") not in ("concluded", "null"):
            raise ValidationError(
                f"An earlier vmsnap job {job['id']} ({job.get('type')}) is still {job.get('status')} in this VM; "
                "wait for it to finish (or cancel it with job-cancel) before starting another.",
                job_id=job["id"],
            )


def _require_snapshot_jobs(version: tuple[int, int, int], what: str) -> None:
    if version < SNAPSHOT_JOBS_SINCE:
        raise ValidationError(
            f"{what} needs QMP snapshot-save/snapshot-load, which QEMU has since 6.0; this VM runs QEMU "
            f"{'.'.join(map(str, version))}. Use vmstate=false (disk-only) or mode=external, or stop the VM and "
            "use vmsnap.qemu.qcow2_snapshot. HMP savevm is deliberately not used."
        )


def _plan_internal(plan: LivePlan, disks: list[tuple[str, dict[str, t.Any]]], version: tuple[int, int, int]) -> None:
    request = plan.request
    if request.state != "absent":
        for label, disk in disks:
            if disk["format"] != "qcow2":
                raise ValidationError(
                    f"Disk {label} ({disk['file']}) is {disk['format']}; internal snapshots need qcow2. "
                    "Leave it out with devices (it will then not be part of the checkpoint), or use mode=external.",
                    device=label,
                )
    plan.devices = [
        DevicePlan(label, disk, has_snapshot=any(snap["name"] == request.name for snap in disk["snapshots"]))
        for label, disk in disks
    ]
    if request.state == "present":
        if _consistent(plan):
            if request.vmstate and not _ram_state_holders(plan):
                raise ValidationError(
                    f"Snapshot {request.name!r} exists on every chosen disk, but holds no RAM state (it was taken "
                    "with vmstate=false), so it cannot be reverted live. Remove it with state=absent and take it "
                    "again, or ask for vmstate=false."
                )
            return
        if request.vmstate:
            _require_snapshot_jobs(version, "An internal snapshot with vmstate")
            plan.vmstate_node = plan.devices[0].node_name
        for device in plan.devices:
            device.action = "create"
    elif request.state == "absent":
        for device in plan.devices:
            if device.has_snapshot:
                device.action = "delete"
    else:
        _plan_internal_revert(plan, version)


def _plan_internal_revert(plan: LivePlan, version: tuple[int, int, int]) -> None:
    request = plan.request
    if not request.vmstate:
        raise ValidationError(
            "A disk-only internal snapshot cannot be reverted in a running VM: QEMU only loads snapshots "
            "together with their RAM state. Stop the VM and revert its disks with vmsnap.qemu.qcow2_snapshot "
            "state=reverted."
        )
    _require_snapshot_jobs(version, "Reverting a running VM")
    missing = [device.label for device in plan.devices if not device.has_snapshot]
    if missing:
        raise ValidationError(
            f"Snapshot {request.name!r} does not exist on {', '.join(missing)}; nothing was reverted. "
            "(QEMU would leave the VM paused in 'restore-vm' after such a failed load.)",
            missing_on=missing,
        )
    for device in plan.devices:
        named = [snap for snap in device.disk["snapshots"] if snap["name"] == request.name]
        if len(named) > 1:
            raise ValidationError(
                f"Disk {device.label} has {len(named)} snapshots named {request.name!r} "
                f"(IDs {', '.join(snap['id'] for snap in named)}); refusing to guess which one to load."
            )
    holders = _ram_state_holders(plan)
    if not holders:
        raise ValidationError(
            f"Snapshot {request.name!r} holds no RAM state on the chosen disks (it is disk-only, or devices leaves "
            "out the disk that holds its RAM state), so it cannot be loaded into a running VM. To revert the disks "
            "only, stop the VM and use vmsnap.qemu.qcow2_snapshot state=reverted."
        )
    # A running mirror or commit job holds an unnamed bitmap: it blocks the revert just the same.
    blocked = [
        (
            f"disk {device.label}",
            blocking_bitmaps((bitmap.get("name"), bitmap.get("busy")) for bitmap in device.disk.get("bitmaps") or []),
        )
        for device in plan.devices
    ]
    check_revert_bitmaps(blocked, request.name, request.backup_bitmaps)
    for device, (dummy, found) in zip(plan.devices, blocked):
        device.drop_bitmaps = found
    plan.vmstate_node = holders[0]
    for device in plan.devices:
        device.action = "revert"


def _ram_state_holders(plan: LivePlan) -> list[str]:
    """Node names of the chosen disks whose snapshot of this name holds the RAM state."""
    return [
        device.node_name
        for device in plan.devices
        if any(snap["name"] == plan.request.name and snap["vm_state_size"] > 0 for snap in device.disk["snapshots"])
    ]


def vm_fingerprint(vm: dict[str, t.Any]) -> list[tuple[t.Any, ...]]:
    """What a live snapshot task can change in a VM: each disk's chain of files and its snapshot names."""
    return [
        (
            disk.get("device"),
            disk.get("qdev"),
            tuple(layer["filename"] for layer in disk["chain"]),
            tuple(snap["name"] for snap in disk["snapshots"]),
        )
        for disk in vm["block_devices"]
    ]


def _plan_external(plan: LivePlan, disks: list[tuple[str, dict[str, t.Any]]]) -> None:
    request = plan.request
    if request.state == "reverted":
        raise ValidationError(
            "External snapshots cannot be reverted in a running VM: discarding the overlays needs the VM stopped. "
            "Stop it, then use vmsnap.qemu.qcow2_chain state=absent on the overlays (the rollback role does this)."
        )
    if request.vmstate and request.state == "present" and plan.vm_status not in SAVEABLE_VM_STATUSES:
        raise ValidationError(
            f"The VM is in status {plan.vm_status!r}; a checkpoint with RAM needs it running or paused "
            "(a VM started with -S that never ran makes QEMU abort).",
            vm_status=plan.vm_status,
        )
    if "/" in request.name or request.name in (".", ".."):
        raise ValidationError(
            f"Snapshot name {request.name!r} becomes part of the overlay file name; it must not contain '/' "
            "or be '.' or '..'."
        )
    for label, disk in disks:
        index = find_overlay(disk["chain"], request.name)
        device = DevicePlan(label, disk, has_snapshot=index is not None, overlay_index=index)
        if index is not None:
            device.overlay = disk["chain"][index]["filename"]
        plan.devices.append(device)
    if request.vmstate or request.state == "absent":
        plan.state_file = state_file_path(disks[0][1]["file"], request.name, request.overlay_dir, plan.devices)
    if request.state == "present":
        if _consistent(plan):
            _check_checkpoint_state_file(plan)
            return
        if request.vmstate:
            if os.path.lexists(t.cast(str, plan.state_file)):
                raise ValidationError(
                    f"The RAM state file {plan.state_file} already exists, but the disks have no overlays of "
                    f"checkpoint {request.name!r}; refusing to overwrite it. Delete it (and its .json sidecar) "
                    "with vmsnap.qemu.qmp_vm_state state=absent, or use another name.",
                    vmstate_file=plan.state_file,
                )
            plan.state_file_action = "create"
        claimed: dict[str, str] = {}
        for device in plan.devices:
            device.overlay = overlay_path(device.disk["file"], request.name, request.overlay_dir)
            _check_new_overlay(device)
            if device.overlay in claimed:
                raise ValidationError(
                    f"Disks {claimed[device.overlay]} and {device.label} would both get the overlay file "
                    f"{device.overlay} (their files have the same name). Leave out overlay_dir so that each overlay "
                    "goes beside its disk, or snapshot them in separate tasks with different overlay_dir.",
                    overlay=device.overlay,
                )
            claimed[device.overlay] = device.label
            device.action = "create"
    else:
        for device in plan.devices:
            if device.has_snapshot:
                device.action = "merge"
        if plan.state_file and (
            os.path.lexists(plan.state_file) or os.path.lexists(plan.state_file + STATE_SIDECAR_SUFFIX)
        ):
            plan.state_file_action = "delete"
        else:
            plan.state_file = None


def state_file_path(
    first_disk_file: str, name: str, overlay_dir: str | None, devices: list[DevicePlan] | None = None
) -> str:
    """<overlay folder>/<first disk's stem>.vmsnap-<name>.vmstate: beside the first disk's overlay.

    Once overlays exist, the disk's file is the overlay: the state file goes beside the disk below it.
    """
    base = first_disk_file
    if devices and devices[0].overlay_index is not None:
        base = devices[0].disk["chain"][devices[0].overlay_index + 1]["filename"]
    folder = overlay_dir or os.path.dirname(base)
    return os.path.join(folder, f"{disk_stem(base)}{OVERLAY_MARK}{name}.vmstate")


def _check_checkpoint_state_file(plan: LivePlan) -> None:
    """Every overlay of the checkpoint exists: with vmstate, its RAM state file must exist too."""
    if not plan.request.vmstate:
        return
    state_file = t.cast(str, plan.state_file)
    if not (os.path.isfile(state_file) and os.path.isfile(state_file + STATE_SIDECAR_SUFFIX)):
        raise ValidationError(
            f"Checkpoint {plan.request.name!r} has its overlays, but no RAM state file {state_file} (with its "
            ".json sidecar): it was taken with vmstate=false, or its state was deleted. Remove it with "
            "state=absent and take it again, or ask for vmstate=false.",
            vmstate_file=state_file,
        )


def _check_new_overlay(device: DevicePlan) -> None:
    overlay = t.cast(str, device.overlay)
    if len(os.path.basename(overlay).encode("utf-8")) > MAX_FILE_NAME_BYTES:
        raise ValidationError(
            f"The overlay file name for {device.label} would be longer than {MAX_FILE_NAME_BYTES} bytes: {overlay}. "
            "Use a shorter snapshot name."
        )
    if os.path.lexists(overlay) and not is_unused_claim(overlay):  # an empty one: the run removes it first
        raise ValidationError(
            f"The overlay file {overlay} for {device.label} already exists but is not part of that disk's chain; "
            "refusing to overwrite it. Move it away or use another snapshot name or overlay_dir.",
            overlay=overlay,
        )
    folder = os.path.dirname(overlay)
    if not os.path.isdir(folder):
        raise ValidationError(f"The overlay folder {folder} does not exist.", overlay=overlay)


def _consistent(plan: LivePlan) -> bool:
    """True when the snapshot exists on every chosen disk; raises when it exists on only some."""
    have = [device.label for device in plan.devices if device.has_snapshot]
    if not have:
        return False
    if len(have) == len(plan.devices):
        return True
    lacking = [device.label for device in plan.devices if not device.has_snapshot]
    raise ValidationError(
        f"Snapshot {plan.request.name!r} exists on {', '.join(have)} but not on {', '.join(lacking)}: the "
        "checkpoint is inconsistent. Remove it with state=absent and take it again, or choose devices.",
        present_on=have,
        missing_on=lacking,
    )


def _plan_quiesce(plan: LivePlan) -> None:
    request = plan.request
    if request.quiesce == "off" or request.state != "present" or not plan.changed:
        return
    if request.with_vmstate:
        problem = (
            "quiesce does not apply to snapshots with vmstate: the frozen file systems would be saved in the RAM "
            "state, and a revert would bring back a frozen guest. The RAM state is consistent as it is."
        )
        if request.quiesce == "required":
            raise ValidationError(problem)
        plan.warnings.append(problem + " Not quiescing.")
        return
    if not request.guest_agent_socket:
        if request.quiesce == "required":
            raise ValidationError("quiesce=required needs guest_agent_socket (the VM's qemu-guest-agent socket).")
        plan.warnings.append("quiesce=best_effort without guest_agent_socket: the snapshot is crash-consistent.")
        return
    plan.quiesce = True


def _view(request: LiveRequest, device: DevicePlan, after: bool) -> list[str]:
    """What --diff shows per disk: internal snapshot names, or the chain's files (top first)."""
    if request.mode == "internal":
        names = [snap["name"] for snap in device.disk["snapshots"]]
        if not after or device.action == "none":
            return names
        if device.action == "create":
            return [*names, request.name]
        if device.action == "delete":
            return [name for name in names if name != request.name]
        return names
    files = [layer["filename"] for layer in device.disk["chain"]]
    if not after or device.action == "none":
        return files
    if device.action == "create":
        return [t.cast(str, device.overlay), *files]
    return [name for index, name in enumerate(files) if index != device.overlay_index]
