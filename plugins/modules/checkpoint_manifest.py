#!/usr/bin/python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: checkpoint_manifest
short_description: Keep the record of a VM checkpoint on the hypervisor - what was taken, and what became of it
version_added: 0.2.0
description:
  - Reads and writes the I(checkpoint manifest) of one checkpoint (O(name)) of one VM (O(vm)), a JSON file
    C(<dir>/<vm>/<name>.json) on the hypervisor that records exactly what was taken - the method, the disks (with the
    device and inode number of each file at that moment), the internal snapshot, overlays, the RAM state file, how
    to start the VM again - and the checkpoint's state.
  - The roles C(checkpoint), C(rollback) and C(release) of this collection keep these manifests; rollback and
    release act only from a manifest, never from guesses.
  - 'A checkpoint moves through the states V(pending) (being taken), V(open) (complete), V(rolled_back) and
    V(released). O(state=query) reads the manifest and never writes.'
  - Folders are created with mode C(0700), a folder open to group or others is tightened to C(0700) (with a
    warning), and manifests are written with mode C(0600) atomically (temporary file, fsync, rename, fsync of the
    folder). A symlink at the VM's folder or at the manifest is refused, never followed.
  - A manifest that cannot be parsed (not JSON, another format, a newer version than this collection knows, a
    different VM or checkpoint inside) fails the task and is left untouched.
author:
  - vmsnap.qemu contributors (@vmsnap)
extends_documentation_fragment:
  - vmsnap.qemu._attributes
attributes:
  check_mode:
    support: full
    details:
      - Check mode reads the manifest and reports what would change, but writes nothing and creates no folders.
  diff_mode:
    support: full
    details:
      - The diff shows the manifest's state and record before and after.
  idempotent:
    support: full
    details:
      - Every state is reached once; a repeated task is unchanged. O(state=pending) with a different record
        updates a pending manifest (changed).
options:
  dir:
    description:
      - Absolute path of the folder that holds the manifests, one subfolder per VM.
      - It may be a symlink to another folder; the VM's subfolder and the manifest may not.
    type: path
    default: /var/lib/vmsnap/manifests
  vm:
    description:
      - The VM's name. 1 to 64 characters out of letters, digits, V(.), V(_), V(+) and V(-), not starting with V(.)
        or V(-).
    type: str
    required: true
  name:
    description:
      - The checkpoint's name, with the same rules as O(vm).
    type: str
    required: true
  state:
    description:
      - V(query) reads the manifest (see O(verify) and O(keep_for)); it never writes.
      - V(pending) records that the checkpoint is being taken. Without a manifest, or over a released one, it writes
        a new pending manifest from O(record) (the old history is kept). A pending manifest gets the given record
        fields if they differ. An open or rolled back checkpoint is left alone (unchanged).
      - V(open) marks a pending checkpoint complete; O(record) is merged over the pending record's fields. An open
        one is unchanged (O(record) is ignored). Without a pending or open manifest, and for a rolled back or
        released one, the task fails.
      - V(rolled_back) marks an open checkpoint rolled back. It fails for a pending checkpoint (interrupted while it
        was being taken), a released one, and when there is none.
      - V(released) marks a pending, open or rolled back checkpoint released. Without a manifest it is unchanged,
        with RV(exists=false).
    type: str
    choices: [query, pending, open, rolled_back, released]
    default: query
  record:
    description:
      - What was taken, for O(state=pending) and O(state=open); only the keys given are set. Unknown keys fail the
        task.
      - Every disk's C(dev) and C(inode) that are not given are filled from the disk's file as it is when the
        record is written, so that a file replaced later is noticed (O(verify)).
      - 'Keys (all optional) - C(method) (V(internal), V(external) or V(offline)); C(hypervisor) (free text);
        C(qmp_socket) and C(qga_socket) (the VM''s sockets); C(vm_start) (how to start the VM again, a dictionary
        with either C(unit) (a systemd unit) or C(argv) (a list, program first)); C(qemu_version); C(snapshot) (the
        internal snapshot of methods V(internal) and V(offline)); C(state_file) (the RAM state file of an external
        checkpoint with RAM); C(disks); C(result) (a dictionary of free-form details, such as the pause). Every key
        may be null.'
      - 'C(disks) is a list of dictionaries with C(file) (absolute path, required), C(format), C(device),
        C(node_name), C(qdev), C(overlay) (the overlay file of an external checkpoint, absolute), C(dev) and
        C(inode).'
    type: dict
  verify:
    description:
      - With O(state=query), check that an open or rolled back checkpoint still matches its files, and fail with
        every mismatch (RV(mismatches)) when it does not. Pending and released checkpoints are not verified.
      - Every disk file must exist with the recorded device and inode number.
      - Methods V(internal) and V(offline) - the internal snapshot must be in every disk's snapshot table, and for
        V(internal) one of them must hold the VM's RAM. Images are read while QEMU may hold them (qemu-img
        C(--force-share) or the collection's own qcow2 reader).
      - Method V(external) - every overlay must exist, be qcow2 and have the disk file as its backing file; the RAM
        state file and its sidecar C(<state_file>.json) must exist.
    type: bool
    default: false
  keep_for:
    description:
      - With O(state=query), a duration such as V(90m), V(24h) or V(7d) (a bare number is seconds). The result then
        has RV(young=true) when the checkpoint was created less than that long ago.
    type: raw
notes:
  - The module must run on the hypervisor that holds the manifests and the VM's files. It takes no QMP socket and
    belongs to no action group.
  - Two tasks that change the same manifest at the same time are not serialized; the last write wins.
requirements:
  - qemu-img on the hypervisor for O(verify=true) of an open or rolled back checkpoint (images that no process holds
    are mostly read by the collection's own qcow2 reader, but qemu-img must be installed).
seealso:
  - module: vmsnap.qemu.qmp_live_snapshot
  - module: vmsnap.qemu.qcow2_snapshot
  - module: vmsnap.qemu.qmp_vm_state
"""

EXAMPLES = r"""
---
- name: Record that the checkpoint is being taken
  vmsnap.qemu.checkpoint_manifest:
    vm: web01
    name: pre-upgrade
    state: pending
    record:
      method: external
      hypervisor: "{{ inventory_hostname }}"
      qmp_socket: /run/vms/web01.qmp
      vm_start:
        unit: qemu@web01.service
      disks:
        - file: /var/lib/vms/web01.qcow2
          format: qcow2
          device: drive0

- name: Record the finished checkpoint (merged over the pending record)
  vmsnap.qemu.checkpoint_manifest:
    vm: web01
    name: pre-upgrade
    state: open
    record:
      state_file: /var/lib/vms/web01.vmsnap-pre-upgrade.vmstate
      disks:
        - file: /var/lib/vms/web01.qcow2
          format: qcow2
          device: drive0
          overlay: /var/lib/vms/web01.vmsnap-pre-upgrade.qcow2
      result:
        downtime_ms: 31.4

- name: Read the checkpoint, fail if its files changed, and tell whether it is younger than a day
  vmsnap.qemu.checkpoint_manifest:
    vm: web01
    name: pre-upgrade
    verify: true
    keep_for: 24h
  register: checkpoint

- name: Mark it released
  vmsnap.qemu.checkpoint_manifest:
    vm: web01
    name: pre-upgrade
    state: released
"""

RETURN = r"""
path:
  description: The manifest's file.
  returned: always
  type: str
  sample: /var/lib/vmsnap/manifests/web01/pre-upgrade.json
exists:
  description: Whether the manifest exists after the task (in check mode, whether it would).
  returned: always
  type: bool
  sample: true
manifest:
  description:
    - The manifest after the task (in check mode, as it would be), or null when there is none.
  returned: always
  type: dict
  sample:
    format: vmsnap-checkpoint-manifest
    version: 1
    vm: web01
    name: pre-upgrade
    state: open
    created: "2026-12-01T20:00:00Z"
    created_epoch: 1796155200.0
    updated: "2026-12-01T20:00:03Z"
    updated_epoch: 1796155203.2
    history:
      - {state: pending, time: "2026-12-01T20:00:00Z", epoch: 1796155200.0}
      - {state: open, time: "2026-12-01T20:00:03Z", epoch: 1796155203.2}
    method: external
    hypervisor: hv1
    qmp_socket: /run/vms/web01.qmp
    qga_socket: null
    vm_start: {unit: qemu@web01.service}
    qemu_version: 7.2.19
    snapshot: null
    state_file: /var/lib/vms/web01.vmsnap-pre-upgrade.vmstate
    disks:
      - {file: /var/lib/vms/web01.qcow2, format: qcow2, device: drive0, node_name: null, qdev: null,
         overlay: /var/lib/vms/web01.vmsnap-pre-upgrade.qcow2, dev: 2049, inode: 1234}
    result: {downtime_ms: 31.4}
previous_state:
  description: The checkpoint's state before the task, or null when there was no manifest.
  returned: always
  type: str
  sample: pending
age_seconds:
  description: Seconds since the checkpoint was created (its C(created_epoch)), or null when there is none.
  returned: always
  type: float
  sample: 3600.5
young:
  description: Whether the checkpoint was created less than O(keep_for) ago (false when there is none).
  returned: when O(keep_for) is given
  type: bool
  sample: true
verified:
  description:
    - Whether O(verify=true) checked the files (and found them matching). False for a missing, pending or released
      checkpoint, which are not verified.
  returned: when O(verify=true)
  type: bool
  sample: true
mismatches:
  description: Every way the checkpoint no longer matches its files (the task then fails).
  returned: when O(verify=true)
  type: list
  elements: str
  sample:
    - /var/lib/vms/web01.qcow2 was replaced (inode 12 -> 99)
    - overlay /var/lib/vms/web01.vmsnap-pre-upgrade.qcow2 is missing
msg:
  description: What the task found or did, in a sentence.
  returned: always
  type: str
  sample: Checkpoint pre-upgrade of VM web01 is now open.
"""

import time
import typing as t

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._manifest import (
    DEFAULT_DIR,
    ManifestError,
    age_seconds,
    diff_view,
    inspect_folders,
    is_young,
    label,
    manifest_path,
    mismatch_message,
    normalize_record,
    plan_transition,
    prepare_folders,
    read_manifest,
    verify,
    write_manifest,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
from ansible_collections.vmsnap.qemu.plugins.module_utils._retention import parse_duration
from ansible_collections.vmsnap.qemu.plugins.module_utils._validate import validate_image_path

ARGUMENT_SPEC: dict[str, t.Any] = dict(
    dir=dict(type="path", default=DEFAULT_DIR),
    vm=dict(type="str", required=True),
    name=dict(type="str", required=True),
    state=dict(type="str", default="query", choices=["query", "pending", "open", "rolled_back", "released"]),
    record=dict(type="dict"),
    verify=dict(type="bool", default=False),
    keep_for=dict(type="raw"),
)


def main() -> t.NoReturn:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    result: dict[str, t.Any] = dict(
        changed=False, path=None, exists=False, manifest=None, previous_state=None, age_seconds=None, msg=""
    )
    try:
        record = _validate(params)
        path = manifest_path(params["dir"], params["vm"], params["name"])
        result["path"] = path
        now = time.time()
        current = read_manifest(path, params["vm"], params["name"])
        result.update(
            exists=current is not None,
            manifest=current,
            previous_state=current["state"] if current else None,
            age_seconds=age_seconds(current, now),
        )
        if params["state"] == "query":
            _query(module, current, now, result)
        else:
            _transition(module, current, record, now, result)
    except VmsnapError as exc:
        result.pop("msg")
        exc.do_fail(module, **result)
    module.exit_json(**result)


def _validate(params: dict[str, t.Any]) -> dict[str, t.Any]:
    validate_image_path(params["dir"], must_exist=False, what="Manifest folder")
    query = params["state"] == "query"
    if params["verify"] and not query:
        raise ValidationError(f"verify=true only goes with state=query, not state={params['state']}.")
    if params["keep_for"] is not None and not query:
        raise ValidationError(f"keep_for only goes with state=query, not state={params['state']}.")
    if params["record"] is not None and params["state"] not in ("pending", "open"):
        raise ValidationError(f"record only goes with state=pending or state=open, not state={params['state']}.")
    if params["keep_for"] is not None:
        params["keep_for"] = parse_duration(params["keep_for"])
    # No suboptions in the argument spec: they would set every key that is not given to null, and open merges
    # only the given keys over the pending record. The core checks the keys and values instead.
    return normalize_record(params["record"])


def _query(module: AnsibleModule, current: dict[str, t.Any] | None, now: float, result: dict[str, t.Any]) -> None:
    params = module.params
    if current is None:
        result["msg"] = f"VM {params['vm']} has no checkpoint {params['name']}."
    else:
        result["msg"] = f"{label(params['vm'], params['name'])} is {current['state']} (created {current['created']})."
    if params["keep_for"] is not None:
        result["young"] = is_young(current, now, params["keep_for"])
    if not params["verify"]:
        return
    result.update(verified=False, mismatches=[])
    if current is None or current["state"] not in ("open", "rolled_back"):
        return
    mismatches = verify(current, QemuImg(module).read_top)
    result["mismatches"] = mismatches
    if mismatches:
        raise ManifestError(mismatch_message(current, mismatches))
    result["verified"] = True
    result["msg"] += " Its files still match it."


def _transition(
    module: AnsibleModule,
    current: dict[str, t.Any] | None,
    record: dict[str, t.Any],
    now: float,
    result: dict[str, t.Any],
) -> None:
    params = module.params
    plan = plan_transition(current, params["state"], params["vm"], params["name"], record, now)
    folders = inspect_folders(params["dir"], params["vm"])
    result.update(
        changed=plan.changed or bool(folders.loose),
        exists=plan.manifest is not None,
        manifest=plan.manifest,
        age_seconds=age_seconds(plan.manifest, now),
        msg=plan.msg,
    )
    if folders.loose:
        done = "would be tightened" if module.check_mode else "were tightened"
        module.warn(f"Manifest folders open to group or others {done} to mode 0700: {', '.join(folders.loose)}.")
    if module._diff:
        result["diff"] = {"before": diff_view(current), "after": diff_view(plan.manifest)}
    if module.check_mode:
        return
    if not plan.write:
        folders.missing = []
    try:
        prepare_folders(params["dir"], params["vm"], folders)
        if plan.write and plan.manifest is not None:
            write_manifest(result["path"], plan.manifest)
    except OSError as exc:
        # The write is atomic: the manifest is still the one before the task; folders may have been made or fixed.
        result.update(changed=bool(folders.loose or folders.missing), exists=current is not None, manifest=current)
        raise ManifestError(f"Cannot write manifest {result['path']}: {exc.strerror or exc}.") from None


if __name__ == "__main__":
    main()
