#!/usr/bin/python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_live_snapshot
short_description: Snapshot, revert and release running QEMU VMs over their QMP socket
version_added: 0.1.0
description:
  - Takes, removes and reverts snapshots of a B(running) VM through its QMP monitor socket, with QMP commands only
    (never HMP C(savevm)), so names are passed as data, existing snapshots are never overwritten and errors come
    back as errors.
  - O(mode=internal) with O(vmstate=true) saves RAM, device state and every chosen disk with the
    C(snapshot-save) job (QEMU 6.0 or later); the guest is paused while its RAM is written. O(state=reverted)
    loads it back with C(snapshot-load), bringing back the running guest as it was.
  - O(mode=internal) with O(vmstate=false) takes disk-only internal snapshots of all chosen disks in one
    C(transaction) without pausing the guest. Such snapshots can only be reverted offline, with
    M(vmsnap.qemu.qcow2_snapshot).
  - O(mode=external) puts a new qcow2 overlay on top of every chosen disk in one C(transaction) (all disks or
    none), without pausing the guest. O(state=absent) merges each overlay back into the layer below it while the
    guest runs (C(block-commit), completed once ready) and then deletes the overlay file.
  - O(mode=external) with O(vmstate=true) is a complete checkpoint - RAM, devices and every chosen disk, of one
    instant - for a pause of milliseconds. The guest is paused, the overlays are taken, and QEMU's
    C(background-snapshot) saves device state at that same instant, write-protects RAM and lets the guest run
    on while RAM is written into a state file (with a JSON sidecar; see M(vmsnap.qemu.qmp_vm_state)). Overlay files
    and the state file's space are prepared before the pause. See the notes for how to roll back to it.
  - For VMs that are shut down, use M(vmsnap.qemu.qcow2_snapshot) and M(vmsnap.qemu.qcow2_chain).
author:
  - vmsnap.qemu contributors (@vmsnap)
extends_documentation_fragment:
  - vmsnap.qemu._attributes
  - vmsnap.qemu._attributes.ACTIONGROUP_QMP
  - vmsnap.qemu._vm_lock
attributes:
  check_mode:
    support: full
    details:
      - Check mode reads the VM over QMP and, when O(quiesce) would be used, asks the guest agent whether it can
        freeze; it changes nothing.
  diff_mode:
    support: full
    details:
      - The diff shows, per disk, the internal snapshot names (O(mode=internal)) or the chain's files, top first
        (O(mode=external)), before and after.
  idempotent:
    support: partial
    details:
      - O(state=reverted) always reports a change, because it always loads the snapshot.
      - O(state=present) and O(state=absent) are idempotent.
options:
  socket:
    description:
      - Absolute path of the VM's QMP socket (C(-qmp unix:PATH,server=on,wait=off)).
    type: path
    required: true
  name:
    description:
      - The snapshot's name. For O(mode=internal) it is the tag inside each qcow2 disk; for O(mode=external) it
        becomes part of each overlay's file name.
      - Must not be empty, purely numeric, longer than 255 bytes or contain control characters. Quotes and spaces
        are fine, because names travel as QMP data. For O(mode=external) it must not contain C(/).
    type: str
    required: true
  mode:
    description:
      - V(internal) keeps the snapshot inside each qcow2 disk; V(external) adds an overlay file per disk.
    type: str
    choices: [internal, external]
    default: internal
  state:
    description:
      - V(present) takes the snapshot on every chosen disk unless it is there already. If it exists on some chosen
        disks but not on others, the task fails, because such a checkpoint is inconsistent.
      - V(absent) removes it from every chosen disk that has it. For O(mode=external) the overlay's data is merged
        into the layer below it, so nothing written since the snapshot is lost, and the overlay file is deleted.
      - V(reverted) loads an internal snapshot with O(vmstate=true) back into the running VM (RAM, devices and
        disks). Disk-only and external snapshots cannot be reverted live and fail with a pointer to the offline
        modules. When O(devices) leaves out writable disks, the task warns, because they keep their newer data,
        which may not match the restored RAM.
      - With O(vmstate=true), V(present) refuses an existing snapshot of that name that holds no RAM state.
    type: str
    choices: [present, absent, reverted]
    default: present
  devices:
    description:
      - The disks to cover, by drive id (C(-drive id=...)), node name (C(-blockdev node-name=...); the original
        node name still works after overlays were put on top of it) or guest device id (C(-device ...,id=...)).
      - Default is every disk the VM can write to. Raw disks cannot hold internal snapshots; leave them out here
        (they are then not part of the checkpoint) or use O(mode=external).
      - M(vmsnap.qemu.qemu_vm_info) lists a VM's disks with these names.
    type: list
    elements: str
  vmstate:
    description:
      - Also save RAM and device state, so that the running guest can be brought back.
      - O(mode=internal) - the first chosen disk holds it, and O(state=reverted) loads it. V(false) takes disk-only
        snapshots that do not pause the guest.
      - O(mode=external) - a state file C(<first disk's file name without .qcow2>.vmsnap-<name>.vmstate) in
        O(overlay_dir) (default - the folder of the first chosen disk), with its sidecar C(<state file>.json).
        Needs QEMU 6.0 or later and a host that can do a background snapshot (see M(vmsnap.qemu.qmp_vm_state)
        O(vmsnap.qemu.qmp_vm_state#module:live)). O(state=absent) deletes the state file once the overlays are
        merged back, whatever O(vmstate) says.
      - Default V(true) for O(mode=internal) and V(false) for O(mode=external).
    type: bool
  overlay_dir:
    description:
      - O(mode=external) only. The folder for the new overlay files; default is the folder of each disk's current
        active file.
      - Overlays are named C(<disk file name without .qcow2>.vmsnap-<name>.qcow2), from the disk's own file name
        (not from overlays stacked on it), so the same task always finds its own overlays again.
      - The task creates each overlay file exclusively, with its disk's owner and mode, before QEMU formats it, and
        deletes only files it created (after QEMU refused the snapshot, or after a merge). An existing file of that
        name that is not part of the disk's chain is never overwritten.
    type: path
  quiesce:
    description:
      - Freeze the guest's file systems through qemu-guest-agent right before the snapshot and thaw them right
        after (always, also when the snapshot fails), so the disks hold clean file systems.
      - V(required) fails before any snapshot is taken when the agent cannot freeze. V(best_effort) warns and takes
        a crash-consistent snapshot instead.
      - Only for O(state=present) with O(vmstate=false). With O(vmstate=true) the RAM state is consistent anyway,
        and a frozen guest would be saved frozen, so V(required) fails and V(best_effort) warns.
    type: str
    choices: ['off', best_effort, required]
    default: 'off'
  guest_agent_socket:
    description:
      - Absolute path of the host side of the VM's qemu-guest-agent channel (a C(virtserialport) named
        C(org.qemu.guest_agent.0) backed by a unix socket). Needed for O(quiesce).
    type: path
  backup_bitmaps:
    description:
      - What O(state=reverted) does about dirty bitmaps on the chosen disks. QEMU cannot load an internal snapshot
        while a disk has any dirty bitmap, and M(vmsnap.qemu.qcow2_backup) keeps one on every disk it backs up
        (named C(vmsnap-backup-<set>-<chain>)).
      - V(fail) refuses the revert before anything is touched and names each bitmap - the backup set it belongs
        to, or another tool.
      - V(drop) removes the backup bitmaps of M(vmsnap.qemu.qcow2_backup) (C(block-dirty-bitmap-remove)) right
        before the C(snapshot-load), in the same pause of the guest, and warns, naming the backup sets. The next
        M(vmsnap.qemu.qcow2_backup) run of each such set finds its bitmap gone and takes a full backup. In check
        mode the task reports what it would remove (RV(dropped_bitmaps)).
      - A bitmap of any other tool, an unnamed bitmap of a running block job, and a backup bitmap that a running
        backup job uses always fail the task, with nothing changed.
      - V(drop) with another O(state) is refused.
    type: str
    choices: [fail, drop]
    default: fail
  after:
    description:
      - O(state=reverted) only. The run state of the VM after the snapshot was loaded.
      - V(unchanged) keeps QEMU's behaviour - a running guest runs on from the snapshot, a paused one stays paused,
        and a QEMU started with C(-S) that never ran (status C(prelaunch)) keeps waiting.
      - V(running) resumes the guest after the load whatever its status was, for example for a QEMU started with
        C(-S) so that the guest runs only from the snapshot on (the rollback role does this when the VM's QEMU was
        gone; it is what C(-loadvm) does, with the checks of this module first).
      - V(running) with another O(state) is refused.
    type: str
    choices: [unchanged, running]
    default: unchanged
  timeout:
    description:
      - Seconds to wait for each QMP command and job (saving RAM, loading, merging an overlay, freezing).
      - A job that is still running after this is reported as still running, never as done.
    type: float
    default: 300
  connect_timeout:
    description:
      - Seconds to wait for the QMP socket (and the guest agent) to connect and greet.
    type: float
    default: 5
notes:
  - The module must run on the hypervisor that holds the sockets and the disk files.
  - 'Rolling back to an external checkpoint with RAM (O(mode=external), O(vmstate=true)) needs a new QEMU process,
    so it is not O(state=reverted). What is supported: 1. end the VM (C(quit)); 2. delete the checkpoint''s overlay
    files (they hold everything written since) - the base images RV(base_images) are then exactly as they were at
    the checkpoint; 3. start QEMU with the same command line on the base images plus C(-incoming defer); 4.
    M(vmsnap.qemu.qmp_vm_state) O(vmsnap.qemu.qmp_vm_state#module:state=restored) with
    O(vmsnap.qemu.qmp_vm_state#module:path) set to RV(vmstate_file) and
    O(vmsnap.qemu.qmp_vm_state#module:after=paused); 5. this module with O(state=present), O(mode=external) and
    O(vmstate=false) and the same O(name), which puts new, empty overlays on the base images; 6.
    M(vmsnap.qemu.qmp_vm_state) O(vmsnap.qemu.qmp_vm_state#module:state=restored) again with
    O(vmsnap.qemu.qmp_vm_state#module:after=running), which resumes the guest. The checkpoint (base images, state
    file) is then unchanged and can be rolled back to again. Skipping step 5 also works, but the restored guest
    then writes into the base images and the checkpoint is used up.'
  - Step 5 takes the new overlays while the restored guest is still paused; without them, a later O(state=absent)
    finds no overlays to merge and only deletes the state file.
  - O(mode=external) with O(state=absent) merges one disk after the other. When a merge fails, the result lists
    the disks already merged (RV(merged_on)).
  - A failed task reports C(changed=true) whenever something may have been done - a job that timed out, a revert,
    a merge, or any difference in the disks' chains and snapshot names from before the task.
  - After a failed C(snapshot-load), QEMU can leave the VM paused in status C(restore-vm) with its disks partly
    reverted. The module reports that status in the failure and does not resume the VM.
  - Internal snapshots and dirty bitmaps (incremental backups) do not mix. Taking a snapshot works, but QEMU refuses
    to revert one while a chosen disk has a dirty bitmap; the module says so before trying, naming each bitmap's
    backup set or owner, or with O(backup_bitmaps=drop) removes the bitmaps of M(vmsnap.qemu.qcow2_backup) first.
  - The VM is refused while it is in status C(restore-vm), C(inmigrate), C(internal-error), C(io-error),
    C(guest-panicked) or C(shutdown) (O(state=absent) still works), and while an earlier vmsnap job is still
    running in it and the task that started it still runs.
  - A task that was killed (SIGKILL, a lost controller) leaves its QEMU job behind; its id
    C(vmsnap-<action>-<pid>-<n>) names the task's process. When that process is gone, the next run (not in check
    mode) waits for the job, completes a block-commit that waits in C(ready) (the merge the killed task asked for),
    dismisses it and warns what it found, then plans as usual. A job paused by someone is left, and refused.
  - With O(mode=external), the next run also removes what a killed task left of this snapshot outside the disks'
    chains - an empty overlay file it had claimed, or (O(state=absent)) an overlay it had merged but not deleted,
    only when the disk reads the same data as that overlay (C(qemu-img compare)); otherwise it warns and keeps it.
  - A task that pauses a running guest (a checkpoint with RAM, a revert that drops backup bitmaps) marks the pause
    in QEMU first (an empty QOM object C(vmsnap-paused-<pid>)); when such a task is killed with the guest still
    paused, the next run resumes it and warns. A guest paused by anyone else is left paused.
  - A checkpoint with RAM whose task was killed after it took the overlays and before its state file was in place
    (the killed task's temporary state file lies beside it) cannot be completed - the guest's RAM is no longer that
    of the overlays' instant. The next O(state=present) run merges those overlays back and takes the checkpoint
    again, and warns. Without such a temporary file, overlays without a state file are refused as before.
  - QEMU serves one client at a time on the guest agent's socket; another connected client makes O(quiesce) fail
    (or, with V(best_effort), be skipped).
seealso:
  - module: vmsnap.qemu.qemu_vm_info
  - module: vmsnap.qemu.qcow2_snapshot
  - module: vmsnap.qemu.qcow2_chain
"""

EXAMPLES = r"""
- name: Checkpoint a running VM with RAM state before an upgrade
  vmsnap.qemu.qmp_live_snapshot:
    socket: /run/vms/web01.qmp
    name: pre-upgrade

- name: Roll the running VM back to it (RAM, devices and disks)
  vmsnap.qemu.qmp_live_snapshot:
    socket: /run/vms/web01.qmp
    name: pre-upgrade
    state: reverted

- name: Roll back a VM whose disks vmsnap.qemu.qcow2_backup backs up (the next backups are then full ones)
  vmsnap.qemu.qmp_live_snapshot:
    socket: /run/vms/web01.qmp
    name: pre-upgrade
    state: reverted
    backup_bitmaps: drop

- name: Release the checkpoint
  vmsnap.qemu.qmp_live_snapshot:
    socket: /run/vms/web01.qmp
    name: pre-upgrade
    state: absent

- name: Overlay both disks of a database VM at once, with its file systems frozen
  vmsnap.qemu.qmp_live_snapshot:
    socket: /run/vms/db01.qmp
    name: nightly
    mode: external
    devices: [drive-system, drive-data]
    overlay_dir: /var/lib/vms/overlays
    quiesce: required
    guest_agent_socket: /run/vms/db01.qga
  register: nightly

- name: Merge the overlays back while the VM runs, and delete them
  vmsnap.qemu.qmp_live_snapshot:
    socket: /run/vms/db01.qmp
    name: nightly
    mode: external
    state: absent

- name: Disk-only internal snapshot, no guest pause (revert offline with qcow2_snapshot)
  vmsnap.qemu.qmp_live_snapshot:
    socket: /run/vms/ci-runner.qmp
    name: clean-state
    vmstate: false
"""

RETURN = r"""
devices:
  description: What was done (or in check mode would be done) per chosen disk.
  returned: success
  type: list
  elements: dict
  contains:
    name:
      description: The disk as the task names it (as given in O(devices), else its drive id, else its C(-device)
        id, else its active node name); the diff uses this name too.
      type: str
      sample: drive0
    device:
      description: The drive id, or null for disks added with C(-blockdev).
      type: str
      sample: drive0
    node_name:
      description: The node name of the disk's active layer before the task.
      type: str
      sample: "#block150"
    file:
      description: The disk's active file before the task.
      type: str
      sample: /var/lib/vms/web01.qcow2
    action:
      description: V(create), V(delete), V(revert), V(merge) (external O(state=absent)) or V(none).
      type: str
      sample: create
    changed:
      description: Whether this disk was (or would be) changed.
      type: bool
      sample: true
    overlay:
      description: O(mode=external) only; the snapshot's overlay file.
      type: str
      sample: /var/lib/vms/overlays/db01-data.vmsnap-nightly.qcow2
    dropped_bitmaps:
      description: O(state=reverted) with O(backup_bitmaps=drop); the backup bitmaps removed from this disk before the
        load (in check mode, that would be removed), each with its backup set.
      type: list
      elements: dict
      sample: [{name: vmsnap-backup-web01-3f9a0c12, set: web01}]
dropped_bitmaps:
  description: All RV(devices[].dropped_bitmaps), each with the disk's name (C(device)).
  returned: success
  type: list
  elements: dict
  sample: [{device: drive0, name: vmsnap-backup-web01-3f9a0c12, set: web01}]
downtime_ms:
  description:
    - How long the guest was paused, in milliseconds, from the timestamps of QEMU's C(STOP) and C(RESUME) events.
    - V(0) when QEMU did not pause the guest (external and disk-only snapshots, deletes, check mode). Those still
      hold the guest's disk I/O for the QMP transaction, which RV(elapsed_ms) bounds.
    - If QEMU stopped the guest and has not resumed it by the end of the task, the pause counts until then and
      the task warns.
  returned: success
  type: float
  sample: 212.8
elapsed_ms:
  description: Wall time of the QMP work in milliseconds (without connecting and reading the VM).
  returned: success
  type: float
  sample: 230.4
frozen:
  description: Whether the guest's file systems were frozen for the snapshot.
  returned: success
  type: bool
  sample: false
frozen_filesystems:
  description: How many file systems the guest agent froze; null when not frozen.
  returned: success
  type: int
  sample: 2
frozen_ms:
  description:
    - How long the guest's file systems were frozen, in milliseconds, from the start of the freeze request (the
      guest blocks new writes from then on) to the end of the thaw; null when not frozen.
  returned: success
  type: float
  sample: 9.7
vmstate_file:
  description: O(mode=external) with O(vmstate=true) (and O(state=absent) when one was deleted); the checkpoint's RAM
    state file. Its sidecar is this path plus C(.json).
  returned: success
  type: str
  sample: /var/lib/vms/web01.vmsnap-pre-upgrade.vmstate
vmstate:
  description: O(mode=external) with O(vmstate=true), when the state was saved by this task; the sidecar's contents
    (see M(vmsnap.qemu.qmp_vm_state)).
  returned: changed
  type: dict
  sample: {"size": 137216042, "ram_size": 1073741824, "qemu_version": "7.2.22"}
base_images:
  description: O(mode=external); per disk, the image below the checkpoint's overlay. After a rollback these are
    what QEMU must be started on.
  returned: success
  type: dict
  sample: {"drive0": /var/lib/vms/web01.qcow2}
deleted_overlays:
  description: O(mode=external), O(state=absent); overlay files merged and deleted.
  returned: success
  type: list
  elements: str
  sample: [/var/lib/vms/overlays/db01-data.vmsnap-nightly.qcow2]
vm_status:
  description: The VM's status after the task (C(running), C(paused), C(restore-vm), ...).
  returned: always
  type: str
  sample: running
merged_on:
  description: On a failed O(state=absent) of external snapshots, the disks whose overlays were already merged.
  returned: failure
  type: list
  elements: str
  sample: [drive0]
removed_overlays:
  description: On a failed external O(state=present), the overlay files this task had created and removed again.
  returned: failure
  type: list
  elements: str
  sample: [/var/lib/vms/db01-system.vmsnap-nightly.qcow2]
leftover_overlays:
  description: On a failed external O(state=present), overlay files this task created but could not remove, with
    the reason; delete them by hand.
  returned: failure
  type: list
  elements: str
  sample: []
snapshot_taken:
  description: On a failure after the snapshot was taken (thawing the guest failed), V(true).
  returned: failure
  type: bool
  sample: true
guest_may_be_frozen:
  description: V(true) when a failed freeze could not be undone either; run C(guest-fsfreeze-thaw) in the guest.
  returned: failure
  type: bool
  sample: true
job_id:
  description: The QMP job that failed, timed out or disappeared; check it with C(query-jobs).
  returned: failure
  type: str
  sample: vmsnap-commit-4242-17
"""

import dataclasses
import os
import typing as t

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._guest_agent import GuestAgentClient, GuestFreezer
from ansible_collections.vmsnap.qemu.plugins.module_utils._live import (
    LivePlan,
    LiveRequest,
    choose_disks,
    overlay_path,
    plan_live,
    state_file_path,
    vm_fingerprint,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._live_execute import LiveOutcome, execute_live
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient, QmpTimeoutError
from ansible_collections.vmsnap.qemu.plugins.module_utils._revert_bitmaps import drop_warning
from ansible_collections.vmsnap.qemu.plugins.module_utils._stale_jobs import (
    finish_orphaned_jobs,
    orphaned_owner,
    pause_marker_cleared,
    process_gone,
    remove_leftover_overlay,
    resume_left_paused,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._validate import (
    validate_image_path,
    validate_snapshot_name,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._vm import describe_vm, status_or_none
from ansible_collections.vmsnap.qemu.plugins.module_utils._vmstate import TEMP_MARK, wait_for_no_migration

ARGUMENT_SPEC: dict[str, t.Any] = dict(
    socket=dict(type="path", required=True),
    name=dict(type="str", required=True),
    mode=dict(type="str", default="internal", choices=["internal", "external"]),
    state=dict(type="str", default="present", choices=["present", "absent", "reverted"]),
    devices=dict(type="list", elements="str"),
    vmstate=dict(type="bool"),
    overlay_dir=dict(type="path"),
    quiesce=dict(type="str", default="off", choices=["off", "best_effort", "required"]),
    guest_agent_socket=dict(type="path"),
    backup_bitmaps=dict(type="str", default="fail", choices=["fail", "drop"]),
    after=dict(type="str", default="unchanged", choices=["unchanged", "running"]),
    timeout=dict(type="float", default=300.0),
    connect_timeout=dict(type="float", default=5.0),
    lock_timeout=dict(type="float", default=60.0),
)


def main() -> t.NoReturn:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    result: dict[str, t.Any] = dict(changed=False, vm_status=None)
    try:
        request = _request(params)
        client = QmpClient(params["socket"], params["connect_timeout"], request.timeout, params["lock_timeout"])
        with client as qmp, pause_marker_cleared(qmp):
            finished = _finish_orphaned_jobs(module, qmp, request.timeout)
            result["changed"] = finished  # what was cleaned up stays reported when a later step fails
            for note in resume_left_paused(qmp, module.check_mode, request.timeout):
                module.warn(note)
                finished = finished or not module.check_mode
                result["changed"] = finished
            vm = describe_vm(qmp)
            if module.check_mode:  # the real run finishes them before planning (see above)
                vm["jobs"] = [job for job in vm.get("jobs") or [] if orphaned_owner(job.get("id")) is None]
            result["vm_status"] = vm["status"]
            finished = _remove_leftover_overlays(module, qmp, request, vm) or finished
            result["changed"] = finished
            undo = _half_checkpoint(qmp, request, vm)
            if undo is not None and not module.check_mode:
                wait_for_no_migration(qmp, request.timeout)
                _act(module, qmp, undo, None, vm_fingerprint(vm), already_changed=finished)
                module.warn(
                    f"Checkpoint {request.name!r} had its overlays but no RAM state file: the task that took it was "
                    "killed before the state file was in place (its temporary file was there). The RAM of that "
                    "instant is lost, so this run merged the overlays back and took the checkpoint again."
                )
                finished = True
                vm = describe_vm(qmp)
            result["changed"] = finished
            if undo is not None and module.check_mode:
                module.warn(
                    f"Checkpoint {request.name!r} has its overlays but no RAM state file: the task that took it was "
                    "killed before the state file was in place. The real run merges the overlays back and takes the "
                    "checkpoint again; this plan shows the merge."
                )
                plan = undo
            else:
                plan = plan_live(request, vm, qmp.version, qmp.execute("query-named-block-nodes"))
            agent = _prepare_quiesce(module, plan, params["connect_timeout"], params["lock_timeout"])
            for warning in plan.warnings:
                module.warn(warning)
            dropped = [(f"disk {device.label}", device.drop_bitmaps) for device in plan.devices if device.drop_bitmaps]
            outcome = LiveOutcome()
            if plan.changed and not module.check_mode:
                outcome = _act(module, qmp, plan, agent, vm_fingerprint(vm), already_changed=finished)
                result["vm_status"] = status_or_none(qmp)
                for warning in outcome.warnings:
                    module.warn(warning)
                if outcome.left_paused:
                    module.warn(
                        f"QEMU paused the guest for this task and has not resumed it (status {result['vm_status']}); "
                        "downtime_ms counts until the end of the task."
                    )
            elif agent is not None:
                agent.close()
            if dropped:
                module.warn(drop_warning(dropped, request.name, done=not module.check_mode))
    except VmsnapError as exc:
        exc.do_fail(module, **result)
    result.update(
        changed=plan.changed or finished,
        devices=[device.result() for device in plan.devices],
        downtime_ms=outcome.downtime_ms,
        elapsed_ms=outcome.elapsed_ms,
        frozen=outcome.frozen,
        frozen_filesystems=outcome.frozen_filesystems,
        frozen_ms=outcome.frozen_ms,
        deleted_overlays=outcome.deleted_overlays,
        dropped_bitmaps=[
            dict(device=device.label, **bitmap.as_dict()) for device in plan.devices for bitmap in device.drop_bitmaps
        ],
        vmstate_file=plan.state_file,
        base_images=_base_images(plan),
    )
    if outcome.vmstate is not None:
        result["vmstate"] = outcome.vmstate.as_dict()
    if module._diff:
        result["diff"] = plan.diff()
    module.exit_json(**result)


def _finish_orphaned_jobs(module: AnsibleModule, qmp: QmpClient, timeout: float) -> bool:
    """Jobs of an earlier task that was killed: finish them (not in check mode); True when one was finished."""
    if module.check_mode:
        for job in qmp.execute("query-jobs") or []:
            if isinstance(job, dict) and orphaned_owner(job.get("id")) is not None:
                module.warn(
                    f"The job {job['id']} ({job.get('type')}, status {job.get('status')}) of an earlier task that no "
                    "longer runs is still in QEMU; the real run finishes and dismisses it first."
                )
        return False
    notes = finish_orphaned_jobs(qmp, timeout)
    for note in notes:
        module.warn(note)
    return bool(notes)


def _remove_leftover_overlays(
    module: AnsibleModule, qmp: QmpClient, request: LiveRequest, vm: dict[str, t.Any]
) -> bool:
    """External: this snapshot's overlay files that a killed task left outside the chains (claimed and never used,
    or merged and not deleted). True when one was removed; check mode leaves them (the plan accepts an empty one)."""
    if request.mode != "external" or request.state == "reverted" or module.check_mode:
        return False
    nodes = qmp.execute("query-named-block-nodes") or []
    in_use = {str(node.get("file")) for node in nodes}
    try:
        disks = choose_disks(vm["block_devices"], request.devices, nodes)
    except VmsnapError:
        return False  # the plan refuses with its own message
    removed = False
    qemu_img = QemuImg(module)
    for dummy, disk in disks:
        overlay = overlay_path(disk["file"], request.name, request.overlay_dir)
        if overlay in in_use or any(layer["filename"] == overlay for layer in disk["chain"]):
            continue
        try:
            note = remove_leftover_overlay(qemu_img, overlay, disk["file"], merged=request.state == "absent")
        except OSError as exc:
            note = f"Could not remove the overlay file {overlay} that an earlier task left: {exc.strerror or exc}."
        if note:
            module.warn(note)
            removed = removed or note.startswith("Removed")
    return removed


def _half_checkpoint(qmp: QmpClient, request: LiveRequest, vm: dict[str, t.Any]) -> LivePlan | None:
    """A checkpoint with RAM whose task was killed after it took the overlays and before its state file was in place
    (a temporary state file of a process that is gone lies beside it): the plan that merges those overlays back, so
    the run can take the checkpoint again. Anything else (no such leftover, a state file there) is None."""
    if request.mode != "external" or not request.vmstate or request.state != "present":
        return None
    nodes = qmp.execute("query-named-block-nodes")
    try:
        undo = plan_live(dataclasses.replace(request, state="absent", quiesce="off"), vm, qmp.version, nodes)
    except VmsnapError:
        return None  # the real plan refuses with its own message
    if not undo.devices or any(device.action != "merge" for device in undo.devices):
        return None
    state_file = state_file_path(undo.devices[0].disk["file"], request.name, request.overlay_dir, undo.devices)
    if os.path.isfile(state_file):
        return None
    folder, name = os.path.split(state_file)
    prefix = f".{name}{TEMP_MARK}"
    try:
        entries = os.listdir(folder)
    except OSError:
        return None
    for entry in entries:
        pid = entry[len(prefix) :].split("-", 1)[0] if entry.startswith(prefix) else ""
        if pid.isdigit() and process_gone(int(pid)):
            return undo
    return None


def _base_images(plan: LivePlan) -> dict[str, str] | None:
    """External: per disk, the image below its overlay (before a create: the disk's active file now)."""
    if plan.request.mode != "external":
        return None
    bases = {}
    for device in plan.devices:
        chain = device.disk["chain"]
        if device.overlay_index is not None:
            bases[device.label] = chain[device.overlay_index + 1]["filename"]
        elif plan.request.state == "present":
            bases[device.label] = str(device.disk["file"])
    return bases


def _request(params: dict[str, t.Any]) -> LiveRequest:
    validate_image_path(params["socket"], must_exist=False, what="Socket")
    name = validate_snapshot_name(params["name"])
    overlay_dir = params["overlay_dir"]
    if overlay_dir is not None:
        if params["mode"] != "external":
            raise ValidationError("overlay_dir applies to mode=external only.")
        validate_image_path(overlay_dir, must_exist=False, what="Overlay folder")
        if not os.path.isdir(overlay_dir):
            raise ValidationError(f"Overlay folder {overlay_dir} does not exist or is not a folder.")
    if params["guest_agent_socket"] is not None:
        validate_image_path(params["guest_agent_socket"], must_exist=False, what="Guest agent socket")
    devices = params["devices"]
    for timeout_name in ("timeout", "connect_timeout"):
        if params[timeout_name] <= 0:
            raise ValidationError(f"{timeout_name} must be a positive number of seconds.")
    for option, value in (("backup_bitmaps", "drop"), ("after", "running")):
        if params[option] == value and params["state"] != "reverted":
            raise ValidationError(f"{option}={value} applies to state=reverted, not state={params['state']}.")
    return LiveRequest(
        name=name,
        mode=params["mode"],
        state=params["state"],
        devices=tuple(devices) if devices is not None else None,
        vmstate=params["vmstate"],
        overlay_dir=overlay_dir,
        quiesce=params["quiesce"],
        guest_agent_socket=params["guest_agent_socket"],
        timeout=params["timeout"],
        backup_bitmaps=params["backup_bitmaps"],
        after=params["after"],
    )


def _prepare_quiesce(
    module: AnsibleModule, plan: LivePlan, connect_timeout: float, lock_timeout: float
) -> GuestAgentClient | None:
    """Connect to the guest agent and check that it can freeze, before anything is snapshotted."""
    if not plan.quiesce:
        return None
    agent = GuestAgentClient(
        t.cast(str, plan.request.guest_agent_socket), connect_timeout, plan.request.timeout, lock_timeout
    )
    try:
        agent.connect()
        GuestFreezer(agent, plan.request.timeout).probe()
    except VmsnapError as exc:
        agent.close()
        if plan.request.quiesce == "required":
            exc.msg = f"quiesce=required, but the guest cannot be frozen; no snapshot was taken. {exc.msg}"
            raise
        module.warn(f"quiesce=best_effort: not freezing the guest ({exc.msg}); the snapshot is crash-consistent.")
        plan.quiesce = False
        return None
    return agent


def _act(
    module: AnsibleModule,
    qmp: QmpClient,
    plan: LivePlan,
    agent: GuestAgentClient | None,
    before: list[tuple[t.Any, ...]],
    already_changed: bool = False,
) -> LiveOutcome:
    """Execute the plan; a failure reports changed=true when anything may have been done (already_changed: this run
    finished or removed what a killed task left, before the plan)."""
    timeout = plan.request.timeout
    try:
        return execute_live(qmp, plan, GuestFreezer(agent, timeout) if agent is not None else None)
    except VmsnapError as exc:
        exc.details.setdefault("vm_status", status_or_none(qmp))
        half_done = bool(exc.details.get("merged_on") or exc.details.get("snapshot_taken"))
        # A failed snapshot-load may have reverted some disks already; a job that timed out may still be running;
        # a failed snapshot-save or -delete can leave some disks done (QEMU does not undo the others).
        changed = (
            already_changed
            or half_done
            or plan.request.state == "reverted"
            or isinstance(exc, QmpTimeoutError)
            or _fingerprint_or_none(qmp) != before
        )
        exc.do_fail(module, changed=changed, devices=[device.result() for device in plan.devices])
    finally:
        if agent is not None:
            agent.close()


def _fingerprint_or_none(qmp: QmpClient) -> list[tuple[t.Any, ...]] | None:
    try:
        return vm_fingerprint(describe_vm(qmp))
    except VmsnapError:
        return None  # cannot tell: counts as changed


if __name__ == "__main__":
    main()
