# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Live snapshots, the acting half: execute_live() carries out a LivePlan (see _live.py) over one QMP client.

Internal snapshots are QMP jobs (snapshot-save/-load/-delete) or one transaction; external ones are one
transaction of overlays (files claimed exclusively first), merged back with block-commit. With vmstate, an
external snapshot also writes the RAM state file of the same instant through _vmstate.save_state().
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
import typing as t
from dataclasses import dataclass, field

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._live import (
    SNAPSHOT_JOBS_SINCE,
    DevicePlan,
    LivePlan,
    LiveSnapshotError,
    overlay_node_name,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import (
    QmpClient,
    QmpConnectionError,
    QmpError,
    pause_of_this_task,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._revert_bitmaps import (
    BlockingBitmap,
    backup_sets,
    blocking_bitmaps,
    refusal_message,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._stale_jobs import mark_paused
from ansible_collections.vmsnap.qemu.plugins.module_utils._vm import describe_vm, status_or_none
from ansible_collections.vmsnap.qemu.plugins.module_utils._vmstate import (
    SaveRequest,
    Sidecar,
    read_vm_facts,
    save_state,
    sidecar_path,
)


@dataclass
class LiveOutcome:
    downtime_ms: float = 0.0
    elapsed_ms: float = 0.0
    frozen: bool = False
    frozen_filesystems: int | None = None
    frozen_ms: float | None = None
    left_paused: bool = False
    warnings: list[str] = field(default_factory=list)
    deleted_overlays: list[str] = field(default_factory=list)
    vmstate: Sidecar | None = None  # external with vmstate: the state file's sidecar
    deleted_vmstate: list[str] = field(default_factory=list)


class Freezer(t.Protocol):
    def freeze(self) -> int: ...

    def thaw(self) -> int: ...


def execute_live(qmp: QmpClient, plan: LivePlan, freezer: Freezer | None) -> LiveOutcome:
    """Act on the plan. freezer is a connected guest agent when the plan quiesces (already probed)."""
    outcome = LiveOutcome()
    request = plan.request
    qmp.poll_events()
    qmp.take_events(("STOP", "RESUME"))
    started = time.monotonic()
    try:
        if request.state == "present" and plan.state_file_action == "create":
            _create_with_ram(qmp, plan, outcome)
        elif request.state == "present":
            with _quiesced(plan, freezer, outcome):
                _create(qmp, plan)
        elif request.state == "absent":
            _remove(qmp, plan, outcome)
            _remove_state_file(plan, outcome)
        else:
            _revert(qmp, plan)
    finally:
        outcome.elapsed_ms = round((time.monotonic() - started) * 1000, 3)
        pause, outcome.left_paused = pause_of_this_task(qmp)
        outcome.downtime_ms = round(outcome.downtime_ms + pause, 3)  # a RAM save counted its own pause
    return outcome


@contextlib.contextmanager
def _quiesced(plan: LivePlan, freezer: Freezer | None, outcome: LiveOutcome) -> t.Iterator[None]:
    """Freeze the guest file systems around the snapshot; always thaw, and never hide a failed thaw."""
    if not plan.quiesce or freezer is None:
        yield
        return
    # The guest blocks new writes as soon as the freeze starts (it then flushes), so the clock starts here.
    frozen_at = time.monotonic()
    try:
        outcome.frozen_filesystems = freezer.freeze()
        outcome.frozen = True
    except VmsnapError as exc:
        if plan.request.quiesce != "best_effort" or exc.details.get("guest_may_be_frozen"):
            raise
        outcome.warnings.append(
            f"quiesce=best_effort: the guest could not be frozen ({exc.msg}); the snapshot is crash-consistent."
        )
    if not outcome.frozen:
        yield
        return
    try:
        yield
    except BaseException as exc:  # whatever went wrong, the guest must not stay frozen
        thaw_problem = _thaw(freezer, outcome, frozen_at)
        if thaw_problem and isinstance(exc, VmsnapError):
            exc.msg += f" Thawing the guest file systems failed as well: {thaw_problem}"
        raise
    thaw_problem = _thaw(freezer, outcome, frozen_at)
    if thaw_problem:
        raise LiveSnapshotError(
            f"The snapshot was taken, but thawing the guest file systems failed: {thaw_problem}. The guest may "
            "still be frozen; thaw it with guest-fsfreeze-thaw.",
            snapshot_taken=True,
        )


def _thaw(freezer: Freezer, outcome: LiveOutcome, frozen_at: float) -> str | None:
    try:
        freezer.thaw()
    except VmsnapError as exc:
        return exc.msg
    finally:
        outcome.frozen_ms = round((time.monotonic() - frozen_at) * 1000, 3)
    return None


def _job_id(action: str) -> str:
    return f"vmsnap-{action}-{os.getpid()}-{time.monotonic_ns() % 1_000_000}"


def _create(qmp: QmpClient, plan: LivePlan) -> None:
    if plan.request.mode != "internal":
        _create_external(qmp, plan)
        return
    try:
        _create_internal(qmp, plan)
    except VmsnapError as exc:
        if exc.details.get("vm_died"):
            exc.msg += (
                f" QEMU was taking the internal snapshot {plan.request.name!r}: one it did not finish is not listed "
                "(qemu-img snapshot -l), but the clusters it had begun to share may stay counted twice. If qemu-img "
                "check then reports only leaked clusters and OFLAG_COPIED errors with refcount=2, qemu-img check -r "
                "all repairs them without touching data; then run this task again on the restarted VM."
            )
        raise


def _create_internal(qmp: QmpClient, plan: LivePlan) -> None:
    request = plan.request
    devices = plan.acting()
    if request.vmstate:
        qmp.run_job(
            "snapshot-save",
            {
                "job-id": _job_id("save"),
                "tag": request.name,
                "vmstate": plan.vmstate_node,
                "devices": [device.node_name for device in devices],
            },
            request.timeout,
        )
        return
    actions = [
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": device.node_name, "name": request.name}}
        for device in devices
    ]
    qmp.execute("transaction", {"actions": actions}, timeout=request.timeout)


def _create_external(qmp: QmpClient, plan: LivePlan) -> None:
    devices = plan.acting()
    claimed = _claim_overlays(devices)
    _overlay_transaction(qmp, devices, claimed, plan.request.timeout)


def _overlay_transaction(qmp: QmpClient, devices: list[DevicePlan], claimed: list[str], timeout: float) -> None:
    actions = [
        {
            "type": "blockdev-snapshot-sync",
            "data": {
                "node-name": device.node_name,
                "snapshot-file": device.overlay,
                "snapshot-node-name": overlay_node_name(t.cast(str, device.overlay)),
                "format": "qcow2",
                "mode": "absolute-paths",
            },
        }
        for device in devices
    ]
    try:
        qmp.execute("transaction", {"actions": actions}, timeout=timeout)
    except QmpError as exc:
        # QEMU answered: the graph is unchanged, so nothing uses the files this task claimed.
        removed, problems = _remove_files(claimed)
        msg = (
            f"QEMU refused the external snapshot: {exc.desc}. The transaction is all-or-nothing, so no disk got an "
            f"overlay; the {len(removed)} overlay file(s) this task had created were removed."
        )
        if problems:
            msg += f" These could not be removed; delete them by hand: {', '.join(problems)}."
        raise LiveSnapshotError(msg, removed_overlays=removed, leftover_overlays=problems) from None
    except QmpConnectionError as exc:
        if exc.details.get("vm_died"):
            _tidy_after_death(exc, claimed)
        raise
    # Any other failure (no answer in time, a live QEMU gone quiet) leaves the files alone: QEMU may be using them.


def _tidy_after_death(exc: VmsnapError, claimed: list[str]) -> None:
    """QEMU died during the overlay transaction: remove the overlays it had not finished creating, name the rest."""
    unfinished = [path for path in claimed if _unfinished_overlay(path)]
    removed, problems = _remove_files(unfinished)
    kept = [path for path in claimed if path not in unfinished]
    if removed:
        exc.msg += (
            f" The overlay transaction was under way: QEMU had not finished creating {', '.join(removed)}, so no "
            "disk had switched to them; they were removed."
        )
    if problems:
        exc.msg += f" These unfinished overlay files could not be removed; delete them by hand: {', '.join(problems)}."
    if kept:
        exc.msg += (
            f" QEMU may have switched disks to the overlay files {', '.join(kept)} and written to them: before the VM "
            "starts again on its disks, merge each into its disk offline with vmsnap.qemu.qcow2_chain "
            "state=committed."
        )
    exc.details.update(removed_overlays=removed, leftover_overlays=kept + problems)


def _unfinished_overlay(path: str) -> bool:
    """Whether QEMU had not finished creating this claimed overlay: empty, no qcow2 header, or no backing file yet.

    QEMU writes an overlay's backing file name last, before it opens the file for the disk, so no disk ever
    switched to (or wrote to) a file without one.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            head = os.read(fd, 16)
        finally:
            os.close(fd)
    except OSError:
        return False  # cannot tell: keep it
    if len(head) < 16 or head[:4] != b"QFI\xfb":
        return True
    return struct.unpack(">Q", head[8:16])[0] == 0


def _create_with_ram(qmp: QmpClient, plan: LivePlan, outcome: LiveOutcome) -> None:
    """Overlays on every chosen disk and the RAM state file, all of one instant, for one short pause.

    The VM's view (disks, RAM size, machine) is read before the pause; the overlays are claimed (created empty,
    exclusively) and the state file's space reserved before it too. In the pause: the overlay transaction, then
    the background snapshot, which saves device state at that same instant (see _vmstate.save_state).
    """
    request = plan.request
    devices = plan.acting()
    facts = read_vm_facts(qmp, describe_vm(qmp))
    claimed = _claim_overlays(devices)
    taken: list[dict[str, str]] = []
    sent = []  # once the transaction was sent, QEMU may use the files (a refusal removes them itself)

    def overlays_in_the_pause() -> list[dict[str, str]]:
        sent.append(True)
        _overlay_transaction(qmp, devices, claimed, request.timeout)
        taken.extend(
            {"disk": device.label, "overlay": t.cast(str, device.overlay), "base": str(device.disk["file"])}
            for device in devices
        )
        return list(taken)

    save = SaveRequest(
        path=t.cast(str, plan.state_file),
        live=True,
        after="running" if facts.running else "paused",
        timeout=request.timeout,
    )
    try:
        saved = save_state(qmp, facts, save, while_paused=overlays_in_the_pause)
    except LiveSnapshotError:
        raise  # the transaction failed: nothing was taken, the claimed files are gone
    except VmsnapError as exc:
        if not sent:
            removed, problems = _remove_files(claimed)
            exc.details.update(removed_overlays=removed, leftover_overlays=problems)
            raise
        if not taken and exc.details.get("vm_died"):
            raise  # the transaction's clean-up after QEMU's death said what became of each overlay file
        if not taken:  # no answer to the transaction: the overlays may be in use, so they stay
            exc.msg += f" The overlay transaction got no answer; the overlay files {', '.join(claimed)} were kept."
            exc.details.update(changed=True, leftover_overlays=claimed)
            raise
        if exc.details.get("vm_died"):
            raise LiveSnapshotError(
                f"The overlays of checkpoint {request.name!r} were taken, but saving its RAM state failed: {exc.msg} "
                f"The overlay files {', '.join(claimed)} may hold guest writes: before the VM "
                "starts again on its disks, merge each into its disk offline with vmsnap.qemu.qcow2_chain "
                "state=committed.",
                snapshot_taken=True,
                overlays_taken=taken,
                vm_died=True,
            ) from None
        raise LiveSnapshotError(
            f"The overlays of checkpoint {request.name!r} were taken, but saving its RAM state failed: {exc.msg} "
            "The disks now have a disk-only checkpoint; remove it with state=absent (which merges the overlays "
            "back) and take it again.",
            snapshot_taken=True,
            overlays_taken=taken,
        ) from None
    outcome.downtime_ms = saved.downtime_ms
    outcome.left_paused = saved.left_paused
    outcome.vmstate = saved.sidecar
    outcome.warnings.extend(saved.warnings)


def _remove_state_file(plan: LivePlan, outcome: LiveOutcome) -> None:
    """After the overlays were merged: the checkpoint's RAM state file and its sidecar go too."""
    if plan.state_file_action != "delete":
        return
    for name in (t.cast(str, plan.state_file), sidecar_path(t.cast(str, plan.state_file))):
        try:
            os.unlink(name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise LiveSnapshotError(
                f"The overlays were merged, but deleting the RAM state file {name} failed: {exc.strerror or exc}.",
                snapshot_taken=True,
            ) from None
        outcome.deleted_vmstate.append(name)


def _claim_overlays(devices: list[DevicePlan]) -> list[str]:
    """Create each overlay file empty and exclusively (O_EXCL) before QEMU writes it.

    Only files this task created are ever removed again, so a file that another task or VM made in the meantime
    (two VMs with same-named disks sharing overlay_dir) is never touched. Each file gets its disk's owner, group
    and mode, so a QEMU running as another user can write it.
    """
    claimed: list[str] = []
    for device in devices:
        overlay = t.cast(str, device.overlay)
        owner = _owner_of(device.disk["file"])
        try:
            mode = owner[2] if owner else 0o644
            fd = os.open(overlay, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            try:
                if owner and os.geteuid() == 0 and owner[:2] != (0, 0):
                    os.fchown(fd, owner[0], owner[1])
                os.fchmod(fd, mode)  # the umask must not cut the disk's mode
            finally:
                os.close(fd)
        except OSError as exc:
            removed, problems = _remove_files(claimed)
            reason = (
                "it appeared after this task checked (another task?); refusing to overwrite or follow it"
                if isinstance(exc, FileExistsError)
                else (exc.strerror or str(exc))
            )
            raise LiveSnapshotError(
                f"Cannot create the overlay file {overlay} for {device.label}: {reason}. No snapshot was taken"
                + (f"; these could not be removed: {', '.join(problems)}." if problems else "."),
                removed_overlays=removed,
                leftover_overlays=problems,
            ) from None
        claimed.append(overlay)
    return claimed


def _owner_of(path: str) -> tuple[int, int, int] | None:
    """(uid, gid, permission bits) of a disk file, or None when it cannot be read (e.g. not a local file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_uid, st.st_gid, st.st_mode & 0o666


def _remove_files(paths: list[str]) -> tuple[list[str], list[str]]:
    """Remove files this task created. Returns (removed, problems); one failure does not stop the others."""
    removed, problems = [], []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"{path} ({exc.strerror or exc})")
        else:
            removed.append(path)
    return removed, problems


def _remove(qmp: QmpClient, plan: LivePlan, outcome: LiveOutcome) -> None:
    request = plan.request
    devices = plan.acting()
    if request.mode == "internal":
        if qmp.version >= SNAPSHOT_JOBS_SINCE:
            qmp.run_job(
                "snapshot-delete",
                {"job-id": _job_id("delete"), "tag": request.name, "devices": [d.node_name for d in devices]},
                request.timeout,
            )
        else:
            for device in devices:
                qmp.execute(
                    "blockdev-snapshot-delete-internal-sync",
                    {"device": device.node_name, "name": request.name},
                    timeout=request.timeout,
                )
        return
    merged: list[str] = []
    for device in devices:
        overlay = t.cast(str, device.overlay)
        try:
            _merge_overlay(qmp, device, request.timeout)
            merged.append(device.label)
            if overlay in _open_files(qmp):
                raise LiveSnapshotError(
                    f"The overlay {overlay} was merged into its backing file, but QEMU still has it open; "
                    "it was not deleted."
                )
            os.unlink(overlay)
        except OSError as exc:
            raise LiveSnapshotError(
                f"The overlay {overlay} was merged into its backing file and QEMU no longer uses it, but deleting it "
                f"failed: {exc.strerror or exc}. Delete it by hand.",
                merged_on=merged,
                deleted_overlays=outcome.deleted_overlays,
            ) from None
        except VmsnapError as exc:
            if exc.details.get("vm_died"):
                base = device.disk["chain"][t.cast(int, device.overlay_index) + 1]["filename"]
                exc.msg += (
                    f" The merge of {overlay} into {base} was under way: {overlay} still holds all its data over "
                    f"{base}, which may now hold part of it. Finish the merge offline with vmsnap.qemu.qcow2_chain "
                    f"path={overlay} state=committed (or start the VM on {overlay} and run this task again); do not "
                    f"start the VM on {base} alone before that."
                )
            exc.details.setdefault("merged_on", merged)
            exc.details.setdefault("deleted_overlays", outcome.deleted_overlays)
            raise
        outcome.deleted_overlays.append(overlay)


def _merge_overlay(qmp: QmpClient, device: DevicePlan, timeout: float) -> None:
    """block-commit the overlay into the layer below it; an active commit is completed when it is ready."""
    chain = device.disk["chain"]
    index = t.cast(int, device.overlay_index)
    nodes = qmp.execute("query-named-block-nodes") or []
    top_node = _format_node(nodes, chain[index])
    base_node = _format_node(nodes, chain[index + 1])
    qmp.run_job(
        "block-commit",
        {
            "job-id": _job_id("commit"),
            "device": device.node_name,
            "top-node": top_node,
            "base-node": base_node,
            "auto-dismiss": False,
        },
        timeout,
        complete_when_ready=index == 0,
    )


def _format_node(nodes: list[dict[str, t.Any]], layer: dict[str, t.Any]) -> str:
    matches = [
        node["node-name"]
        for node in nodes
        if node.get("file") == layer["filename"] and node.get("drv") == layer["format"]
    ]
    if len(matches) != 1:
        raise LiveSnapshotError(
            f"Cannot tell which QEMU block node is {layer['filename']} ({len(matches)} candidates); "
            "nothing was merged.",
            image_path=layer["filename"],
        )
    return str(matches[0])


def _open_files(qmp: QmpClient) -> set[str]:
    return {str(node.get("file")) for node in qmp.execute("query-named-block-nodes") or []}


def _revert(qmp: QmpClient, plan: LivePlan) -> None:
    """snapshot-load; backup bitmaps to drop are removed in the same pause, right before it.

    QEMU keeps the run state over a load (running runs on, paused and prelaunch stay so). When bitmaps are
    dropped, a running guest is paused first, so the load starts from exactly the disks this task checked.
    """
    request = plan.request
    drops = [(device, bitmap) for device in plan.acting() for bitmap in device.drop_bitmaps]
    paused_here = bool(drops) and plan.vm_running
    if paused_here:
        mark_paused(qmp)  # a killed task's pause is then recognised and ended by the next run
        qmp.execute("stop", timeout=request.timeout)
    try:
        _drop_bitmaps(qmp, drops)
    except VmsnapError:
        if paused_here:
            qmp.execute("cont", timeout=request.timeout)
        raise
    try:
        _load(qmp, plan)
    except VmsnapError as exc:
        if drops:
            dropped = [bitmap for dummy, bitmap in drops]
            exc.msg += (
                f" The backup bitmaps {', '.join(str(bitmap.name) for bitmap in dropped)} had been removed before the "
                f"load: the next vmsnap.qemu.qcow2_backup run of backup set "
                f"{', '.join(map(repr, backup_sets(dropped)))} takes a full backup."
            )
            exc.details["dropped_bitmaps"] = [dict(device=device.label, **bitmap.as_dict()) for device, bitmap in drops]
        raise
    if (paused_here or request.after == "running") and status_or_none(qmp) != "running":
        qmp.execute("cont", timeout=request.timeout)


def _drop_bitmaps(qmp: QmpClient, drops: list[tuple[DevicePlan, BlockingBitmap]]) -> None:
    removed: list[tuple[str, BlockingBitmap]] = []
    for device, bitmap in drops:
        try:
            qmp.execute("block-dirty-bitmap-remove", {"node": device.node_name, "name": bitmap.name})
        except VmsnapError as exc:
            msg = (
                f"Removing the backup bitmap '{bitmap.name}' from disk {device.label} before the revert failed: "
                f"{exc.msg} The snapshot was not loaded."
            )
            if removed:
                msg += (
                    f" Already removed: {', '.join(str(gone.name) for dummy, gone in removed)}; the next "
                    "vmsnap.qemu.qcow2_backup run of backup set "
                    f"{', '.join(map(repr, backup_sets(gone for dummy, gone in removed)))} "
                    "takes a full backup."
                )
            raise LiveSnapshotError(
                msg, dropped_bitmaps=[dict(device=d, **gone.as_dict()) for d, gone in removed]
            ) from None
        removed.append((device.label, bitmap))


def _load(qmp: QmpClient, plan: LivePlan) -> None:
    request = plan.request
    try:
        qmp.run_job(
            "snapshot-load",
            {
                "job-id": _job_id("load"),
                "tag": request.name,
                "vmstate": plan.vmstate_node,
                "devices": [device.node_name for device in plan.acting()],
            },
            request.timeout,
        )
    except VmsnapError as exc:
        if exc.details.get("vm_died"):
            exc.msg += (
                f" QEMU was loading snapshot {request.name!r}: its disks may already hold the snapshot's data, "
                "without the RAM that goes with it. If qemu-img check then reports only leaked clusters and "
                "OFLAG_COPIED errors with refcount=2 (a revert cut short leaves clusters counted twice), qemu-img "
                "check -r all repairs them without touching data. Start the VM paused (-S) and run this task again "
                "to load the snapshot whole."
            )
            exc.details["vm_status"] = None
            raise
        if "active dirty bitmaps" in exc.msg:
            _name_the_bitmaps(qmp, plan, exc)
        status = status_or_none(qmp)
        if plan.vm_running and status is not None and status != "running":
            exc.msg += (
                f" QEMU left the VM paused (status {status!r}); its disks may already be partly "
                "reverted, so do not simply resume it: revert again, or stop it and restore offline."
            )
        exc.details["vm_status"] = status
        raise


def _name_the_bitmaps(qmp: QmpClient, plan: LivePlan, exc: VmsnapError) -> None:
    """A bitmap appeared after the plan (a backup started meanwhile): name it and its owner, not QEMU's words."""
    try:
        vm = describe_vm(qmp)
    except VmsnapError:
        return
    chosen = {device.node_name: device.label for device in plan.acting()}
    blocked = [
        (
            f"disk {chosen[disk['node_name']]}",
            blocking_bitmaps((bitmap.get("name"), bitmap.get("busy")) for bitmap in disk.get("bitmaps") or []),
        )
        for disk in vm["block_devices"]
        if disk.get("node_name") in chosen
    ]
    exc.msg = (
        refusal_message(blocked, plan.request.name, plan.request.backup_bitmaps, nothing_changed=False)
        + " They appeared after the task had checked the VM, and QEMU refused the load."
    )
    exc.details["bitmaps"] = [bitmap.name for dummy, found in blocked for bitmap in found]
