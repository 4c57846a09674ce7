#!/usr/bin/python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_vm_state
short_description: Save a running QEMU VM's RAM and device state to a file, and restore it into a waiting QEMU
version_added: 0.2.0
description:
  - Saves the RAM and device state of a running VM into a file through its QMP socket, and loads such a file into
    a QEMU that was started with C(-incoming defer). Together with the VM's disks as they were at that instant,
    this brings back the running guest exactly where it was, in a new QEMU process ("suspend to disk").
  - No shell is used, inside or outside QEMU. The module opens the file itself (exclusively, mode C(0600), under a
    temporary name in the same folder) and hands its descriptor to QEMU over the QMP socket (C(getfd)); it never
    uses C(exec:) migration URIs.
  - With O(live=true) (the default) the guest keeps running while its RAM is written (QEMU's C(background-snapshot)
    migration capability, QEMU 6.0 or later). It pauses only to save device state and write-protect its RAM,
    usually for tens of milliseconds, and the file holds RAM as it was at that instant.
  - Because a write that fails during a background snapshot hangs QEMU for good, the file's whole space (RAM size
    plus a margin for device state) is reserved with C(posix_fallocate) before QEMU gets the file, and the task is
    refused, with the numbers, when that fails. O(compress=true) compresses the finished file afterwards, never the
    stream.
  - Beside the file the module writes a JSON sidecar, C(<path>.json) (mode C(0600)), with what a restore must
    match. A restore compares it with the waiting QEMU before anything is loaded.
  - To take the disks at the same instant as the RAM (a complete checkpoint), use M(vmsnap.qemu.qmp_live_snapshot)
    with O(vmsnap.qemu.qmp_live_snapshot#module:mode=external) and
    O(vmsnap.qemu.qmp_live_snapshot#module:vmstate=true), which uses this module's core.
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
      - Check mode reads the VM and the files and makes every check a real run makes (for O(state=restored) that
        includes the state file's checksum), but touches neither QEMU nor the files.
  diff_mode:
    support: full
    details:
      - The diff shows the state file (absent, or its size and checksum) and the VM's status before and after.
  idempotent:
    support: full
    details:
      - O(state=saved) leaves an existing state file with a matching sidecar alone unless O(force=true).
      - A second O(state=restored) into the QEMU that this module already restored the file into is unchanged,
        apart from bringing the VM to O(after) (resuming a paused VM counts as a change).
options:
  socket:
    description:
      - Absolute path of the VM's QMP socket. Required for O(state=saved) and O(state=restored).
    type: path
  path:
    description:
      - Absolute path of the state file. Its sidecar is C(<path>.json).
    type: path
    required: true
  state:
    description:
      - V(saved) writes the VM's state to O(path) unless a state file with a matching sidecar is there already
        (then QEMU is not even contacted, so a VM that quit after its save does not fail a re-run). The VM must be
        C(running) or C(paused).
      - V(restored) loads O(path) into a QEMU that waits for it (status C(inmigrate), started with the saved VM's
        command line plus C(-incoming defer)). Anything else is refused, and so is every difference between the
        sidecar and the waiting QEMU (QEMU version, machine type, RAM size, disks and their image files); that QEMU
        then keeps waiting. A state file whose size or checksum differs from its sidecar is refused the same way.
      - V(absent) deletes the state file and its sidecar. A file without a sidecar is only deleted if it is a QEMU
        state stream, or with O(force=true).
    type: str
    choices: [saved, restored, absent]
    default: saved
  live:
    description:
      - V(true) saves with QEMU's C(background-snapshot) while the guest runs (a pause of milliseconds). It needs
        QEMU 6.0 or later, userfaultfd write-protection on the host (root, or C(vm.unprivileged_userfaultfd=1)) and
        guest RAM that is not a file on a regular file system; otherwise the task fails before anything is written
        and says why.
      - V(false) pauses the guest for the whole save. QEMU then reports the VM as C(postmigrate) (paused, its disks
        released) until it is resumed.
      - A VM that is paused already is saved as it is, but QEMU 7.2's background snapshot resumes it while its RAM is
        written (the task warns; O(after) then pauses it again). Use V(false) to keep such a VM paused throughout.
    type: bool
    default: true
  after:
    description:
      - What the VM does once the state is safe on disk. V(running) resumes it (with O(live=false), as soon as QEMU
        has written the state), V(paused) leaves it paused, V(quit) ends QEMU ("suspend to disk").
      - For O(state=restored), V(running) or V(paused); V(paused) lets you take new overlays
        (M(vmsnap.qemu.qmp_live_snapshot)) before the restored guest runs again.
    type: str
    choices: [running, paused, quit]
    default: running
  compress:
    description:
      - Compress the finished state file with gzip (level 1) before it is put in place. The save itself always
        writes uncompressed into reserved space; the compressed file replaces it afterwards.
      - A restore decompresses it into a pipe that QEMU reads.
    type: bool
    default: false
  force:
    description:
      - O(state=saved) replaces an existing state file (and its sidecar), also one without a sidecar.
      - O(state=restored) accepts a waiting QEMU of another version (the machine type must still match).
      - O(state=absent) deletes O(path) even when it does not look like a state file.
    type: bool
    default: false
  timeout:
    description:
      - Seconds to wait for the save or the load to finish, and for an earlier save in the same VM to end. A save
        that is still running then is cancelled and reported as failed, never as done.
    type: float
    default: 300
  connect_timeout:
    description:
      - Seconds to wait for the QMP socket to connect and greet.
    type: float
    default: 5
notes:
  - The module must run on the hypervisor that holds the socket and the files. The RAM state belongs to the disks as
    they were when it was saved; the module does not snapshot disks. Restoring it over disks that changed since
    brings back a guest whose page cache no longer matches its disks.
  - 'A state saved with O(live=true) records RAM as it was when the save started; the task still returns only when
    the whole file is written.'
  - If a task is killed during a save, QEMU finishes writing into the temporary file, which is never renamed into
    place (and is removed by the next save to the same O(path)); the next task waits for that save to end.
  - Before it pauses a running guest, the task adds a marker object C(vmsnap-paused-<pid>) to QEMU (an empty QOM
    C(secret), which ends with the QEMU process) and removes it when it ends. If the task is killed while the guest
    is paused, the next O(state=saved) task (or M(vmsnap.qemu.qmp_live_snapshot) task) on the VM finds the marker of
    a process that is gone, resumes the guest (after a save that is still being written has ended) and warns. A
    guest paused by anyone else has no such marker and is left as it is.
  - Before a restore loads the state, the task adds a marker object C(vmsnap-restored-<first 40 hex digits of the
    state's SHA-256>) to the waiting QEMU. A task killed after QEMU loaded the state and before the task recorded the
    restore in the sidecar leaves that QEMU paused and no longer waiting; the next O(state=restored) run finds the
    marker (and the completed incoming migration), takes the state as restored into this QEMU and only brings it to
    O(after).
  - The save sets QEMU's C(background-snapshot) capability and a high C(max-bandwidth) for its own migration and puts
    both back afterwards, also after a failure. A VM with other migration capabilities on (C(block), C(xbzrle),
    C(compress), C(multifd), ...) is refused, because they change what the file holds.
  - The state is handed to QEMU as a descriptor (C(fd:)). QEMU 9.1 and later warn that C(fd:) on a plain file is
    deprecated in favour of C(file:); this module has only been tested with QEMU 7.2.
seealso:
  - module: vmsnap.qemu.qmp_live_snapshot
  - module: vmsnap.qemu.qemu_vm_info
"""

EXAMPLES = r"""
- name: Save the running VM's RAM and devices (the guest pauses for milliseconds)
  vmsnap.qemu.qmp_vm_state:
    socket: /run/vms/web01.qmp
    path: /var/lib/vms/web01.vmstate

- name: Suspend to disk - save the state, compressed, and end QEMU
  vmsnap.qemu.qmp_vm_state:
    socket: /run/vms/web01.qmp
    path: /var/lib/vms/web01.vmstate.gz
    compress: true
    after: quit

# Start QEMU again with the same command line plus "-incoming defer", then:
- name: Bring the guest back where it was
  vmsnap.qemu.qmp_vm_state:
    socket: /run/vms/web01.qmp
    path: /var/lib/vms/web01.vmstate.gz
    state: restored

- name: Delete the state file and its sidecar
  vmsnap.qemu.qmp_vm_state:
    path: /var/lib/vms/web01.vmstate.gz
    state: absent
"""

RETURN = r"""
state_file:
  description: The state file (O(path)).
  returned: always
  type: str
  sample: /var/lib/vms/web01.vmstate
size:
  description: Size of the state file in bytes (compressed size when compressed); null when there is none.
  returned: success
  type: int
  sample: 137216042
downtime_ms:
  description:
    - O(state=saved) - how long the guest was paused for the save, in milliseconds, from the timestamps of QEMU's
      C(STOP) and C(RESUME) events. With O(live=true) that is the short pause of the capture (the pause that
      O(after=paused) or O(after=quit) asks for at the end is not counted). With O(live=false) it lasts until the
      guest is resumed (O(after=running)), or counts until the file is finished otherwise. V(0) when nothing was
      saved.
  returned: success
  type: float
  sample: 31.4
elapsed_ms:
  description: Wall time of the save (until the file is in place) or of the load, in milliseconds.
  returned: success
  type: float
  sample: 2350.2
vm_status:
  description: The VM's status after the task; null after O(after=quit), and when O(state=saved) found the state
    file complete and did not contact QEMU.
  returned: always
  type: str
  sample: running
sidecar:
  description: The sidecar's contents (for O(state=absent), what was deleted).
  returned: success
  type: dict
  sample:
    file: web01.vmstate
    size: 137216042
    sha256: 5f0c6e1d2b9a8c7e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e
    compression: null
    live: true
    time: "2026-12-01T17:34:03+00:00"
    qemu_version: 7.2.22
    machine: pc-q35-7.2-machine
    ram_size: 1073741824
    disks:
      - slot: /machine/peripheral/vd0/virtio-backend
        device: null
        node_name: disk0
        file: /var/lib/vms/web01.qcow2
        format: qcow2
    cmdline: [qemu-system-x86_64, -m, "1024"]
    with_overlays: []
    last_restore: null
    format: 1
mismatches:
  description: On a refused restore, every difference between the sidecar and the waiting QEMU.
  returned: failure
  type: list
  elements: str
  sample: ["RAM size: saved 1073741824 bytes, the waiting QEMU has 536870912 bytes"]
needed_bytes:
  description: On a save refused for lack of space, the bytes the state file may need.
  returned: failure
  type: int
  sample: 1140850688
free_bytes:
  description: On a save refused for lack of space, the free bytes of the state file's file system.
  returned: failure
  type: int
  sample: 52428800
"""

import os
import typing as t

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient
from ansible_collections.vmsnap.qemu.plugins.module_utils._stale_jobs import pause_marker_cleared, resume_left_paused
from ansible_collections.vmsnap.qemu.plugins.module_utils._validate import validate_image_path
from ansible_collections.vmsnap.qemu.plugins.module_utils._vm import describe_vm, status_or_none
from ansible_collections.vmsnap.qemu.plugins.module_utils._vmstate import (
    GZIP_MAGIC,
    STATE_MAGIC,
    SaveRequest,
    Sidecar,
    StateFileError,
    already_restored_into,
    bring_to,
    file_magic,
    read_sidecar,
    read_vm_facts,
    refuse_unrestorable,
    refuse_unsaveable,
    restore_state,
    restored_by_killed_task,
    save_state,
    sidecar_path,
)

ARGUMENT_SPEC: dict[str, t.Any] = dict(
    socket=dict(type="path"),
    path=dict(type="path", required=True),
    state=dict(type="str", default="saved", choices=["saved", "restored", "absent"]),
    live=dict(type="bool", default=True),
    after=dict(type="str", default="running", choices=["running", "paused", "quit"]),
    compress=dict(type="bool", default=False),
    force=dict(type="bool", default=False),
    timeout=dict(type="float", default=300.0),
    connect_timeout=dict(type="float", default=5.0),
    lock_timeout=dict(type="float", default=60.0),
)


def main() -> t.NoReturn:
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        supports_check_mode=True,
        required_if=[("state", "saved", ["socket"]), ("state", "restored", ["socket"])],
    )
    params = module.params
    result: dict[str, t.Any] = dict(changed=False, state_file=params["path"], vm_status=None)
    try:
        _validate(params)
        if params["state"] == "absent":
            _absent(module, result)
        elif params["state"] == "saved":
            _saved(module, result)
        else:
            _restored(module, result)
    except VmsnapError as exc:
        exc.do_fail(module, **result)
    module.exit_json(**result)


def _validate(params: dict[str, t.Any]) -> None:
    path = validate_image_path(params["path"], must_exist=False, what="State file")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise ValidationError(f"The folder of the state file, {folder}, does not exist.")
    if os.path.isdir(path):
        raise ValidationError(f"{path} is a folder; path must name the state file.")
    if params["socket"] is not None:
        validate_image_path(params["socket"], must_exist=False, what="Socket")
    for timeout_name in ("timeout", "connect_timeout"):
        if params[timeout_name] <= 0:
            raise ValidationError(f"{timeout_name} must be a positive number of seconds.")
    if params["state"] == "restored" and params["after"] == "quit":
        raise ValidationError("after=quit does not apply to state=restored; use running or paused.")


def _file_view(path: str, sidecar: Sidecar | None) -> dict[str, t.Any]:
    if not os.path.lexists(path):
        return {"state_file": None, "sidecar": sidecar is not None}
    return {
        "state_file": path,
        "size": os.lstat(path).st_size,
        "sha256": sidecar.sha256 if sidecar else None,
        "sidecar": sidecar is not None,
    }


def _saved(module: AnsibleModule, result: dict[str, t.Any]) -> None:
    params = module.params
    path = params["path"]
    sidecar = read_sidecar(path)
    exists = os.path.lexists(path)
    if exists and not params["force"]:
        if sidecar is None:
            raise StateFileError(
                f"{path} exists but has no sidecar ({sidecar_path(path)}); it was not made by this module (or its "
                "sidecar was removed). Refusing to overwrite it; force=true replaces it.",
                path=path,
            )
        if sidecar.size != os.path.getsize(path) or sidecar.file != os.path.basename(path):
            raise StateFileError(
                f"{path} does not match its sidecar (size {os.path.getsize(path)}, sidecar says {sidecar.size}); "
                "refusing to guess. Delete both with state=absent, or replace them with force=true.",
                path=path,
            )
        # Complete already: nothing to ask QEMU, which may well be gone (after=quit, suspend to disk).
        result.update(size=os.path.getsize(path), sidecar=sidecar.as_dict(), downtime_ms=0.0)
        return
    before = _file_view(path, sidecar)
    client = QmpClient(params["socket"], params["connect_timeout"], params["timeout"], params["lock_timeout"])
    with client as qmp, pause_marker_cleared(qmp):
        for note in resume_left_paused(qmp, module.check_mode, params["timeout"]):
            module.warn(note)
            result["changed"] = not module.check_mode
        vm = describe_vm(qmp)
        result["vm_status"] = vm["status"]
        facts = read_vm_facts(qmp, vm)
        refuse_unsaveable(facts, params["live"])
        result["changed"] = module.check_mode or result["changed"]
        if module._diff:
            result["diff"] = {
                "before": {**before, "vm_status": vm["status"]},
                "after": {"state_file": path, "sidecar": True, "vm_status": _status_after(params["after"])},
            }
        if module.check_mode:
            return
        request = SaveRequest(
            path=path,
            live=params["live"],
            after=params["after"],
            compress=params["compress"],
            timeout=params["timeout"],
        )
        try:
            outcome = save_state(qmp, facts, request)
        except VmsnapError as exc:
            exc.details.setdefault("vm_status", status_or_none(qmp))
            if result["changed"]:  # this run resumed a guest that a killed task had left paused
                exc.details["changed"] = True
            raise
        for warning in outcome.warnings:
            module.warn(warning)
        if outcome.left_paused and params["after"] == "running":
            module.warn("QEMU paused the guest for the save and has not resumed it; downtime_ms counts until now.")
        sidecar = t.cast(Sidecar, outcome.sidecar)
        result.update(
            changed=True,
            size=sidecar.size,
            sidecar=sidecar.as_dict(),
            downtime_ms=outcome.downtime_ms,
            elapsed_ms=outcome.elapsed_ms,
            vm_status=outcome.vm_status,
        )


def _restored(module: AnsibleModule, result: dict[str, t.Any]) -> None:
    params = module.params
    path = params["path"]
    if not os.path.isfile(path):
        raise StateFileError(f"The state file {path} does not exist.", path=path)
    sidecar = read_sidecar(path)
    with QmpClient(params["socket"], params["connect_timeout"], params["timeout"], params["lock_timeout"]) as qmp:
        vm = describe_vm(qmp)
        result["vm_status"] = vm["status"]
        facts = read_vm_facts(qmp, vm)
        if facts.status != "inmigrate" and (
            already_restored_into(sidecar, facts) or restored_by_killed_task(qmp, sidecar)
        ):
            _converge_restored(module, qmp, result, facts.running)
            result.update(size=os.path.getsize(path), sidecar=t.cast(Sidecar, sidecar).as_dict())
            return
        sidecar = refuse_unrestorable(path, sidecar, facts, params["force"])
        result["changed"] = module.check_mode
        if module._diff:
            result["diff"] = {
                "before": {"vm_status": facts.status},
                "after": {"vm_status": params["after"], "restored_from": path},
            }
        result.update(size=sidecar.size, sidecar=sidecar.as_dict())
        if module.check_mode:
            return
        try:
            outcome = restore_state(qmp, path, sidecar, facts, params["after"], params["timeout"])
        except VmsnapError as exc:
            exc.details.setdefault("vm_status", status_or_none(qmp))
            if result["changed"]:  # this run resumed a guest that a killed task had left paused
                exc.details["changed"] = True
            raise
        for warning in outcome.warnings:
            module.warn(warning)
        result.update(
            changed=True, elapsed_ms=outcome.elapsed_ms, vm_status=outcome.vm_status, sidecar=sidecar.as_dict()
        )


def _converge_restored(module: AnsibleModule, qmp: QmpClient, result: dict[str, t.Any], running: bool) -> None:
    """A second restored: the state is in; only the run state may still differ from after."""
    after = module.params["after"]
    result["msg"] = "This state was already restored into this QEMU."
    if (after == "running") == running:
        return
    result["changed"] = True
    if module._diff:
        result["diff"] = {"before": {"vm_status": result["vm_status"]}, "after": {"vm_status": after}}
    if not module.check_mode:
        result["vm_status"] = bring_to(qmp, after)


def _absent(module: AnsibleModule, result: dict[str, t.Any]) -> None:
    params = module.params
    path = params["path"]
    side = sidecar_path(path)
    try:
        sidecar = read_sidecar(path)
    except StateFileError:
        if not params["force"]:
            raise
        sidecar = None
    exists = os.path.lexists(path)
    if exists and sidecar is None and not params["force"]:
        magic = file_magic(path)
        if not magic.startswith(STATE_MAGIC) and not (magic.startswith(GZIP_MAGIC) and os.path.lexists(side)):
            raise StateFileError(
                f"{path} has no sidecar and is not a QEMU state stream; refusing to delete it (is path right?). "
                "force=true deletes it anyway.",
                path=path,
            )
    present = [name for name in (path, side) if os.path.lexists(name)]
    result["changed"] = bool(present)
    result["sidecar"] = sidecar.as_dict() if sidecar else None
    if module._diff:
        result["diff"] = {"before": _file_view(path, sidecar), "after": {"state_file": None, "sidecar": False}}
    if module.check_mode:
        return
    for name in present:
        try:
            os.unlink(name)
        except OSError as exc:
            raise StateFileError(f"Cannot delete {name}: {exc.strerror or exc}.", path=name) from None


def _status_after(after: str) -> str | None:
    return {"running": "running", "paused": "paused"}.get(after)


if __name__ == "__main__":
    main()
