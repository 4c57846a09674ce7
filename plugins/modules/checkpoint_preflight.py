#!/usr/bin/python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: checkpoint_preflight
short_description: Decide how to checkpoint a QEMU VM, and refuse every situation in which no checkpoint should be taken
version_added: 0.3.0
description:
  - Runs on the hypervisor before a checkpoint is taken and writes nothing. It finds out whether the VM runs (its
    QMP socket answers) or is stopped (O(disks) is given and nothing answers), chooses the checkpoint method, and
    fails, with a message that names the VM and the reason (RV(reason) on failure), when a checkpoint should not be
    taken now.
  - V(internal) is a checkpoint of a running VM inside its qcow2 disks, with RAM
    (M(vmsnap.qemu.qmp_live_snapshot) with O(vmsnap.qemu.qmp_live_snapshot#module:mode=internal)).
    V(external) puts an overlay on every writable disk and saves the RAM into a state file while the guest runs
    (O(vmsnap.qemu.qmp_live_snapshot#module:mode=external), O(vmsnap.qemu.qmp_live_snapshot#module:vmstate=true));
    rolling it back restarts QEMU. V(offline) takes internal snapshots of a stopped VM's disks
    (M(vmsnap.qemu.qcow2_snapshot)).
  - Refused are a VM in any status but C(running) or C(paused), a VM that runs a block job, a method that does not
    fit the VM, disks in the wrong format, images in use by another process (found through QEMU's image locks and
    by a scan of C(/proc/*/fd)), too many snapshots or too deep a chain, too little free space, and a guest agent
    that does not answer when O(quiesce=required).
  - For a running VM, the live snapshot planner of M(vmsnap.qemu.qmp_live_snapshot) is asked as well, so that a
    checkpoint this module allows is not refused there (an overlay file that is in the way, a checkpoint present on
    only some disks, ...).
author:
  - vmsnap.qemu contributors (@vmsnap)
extends_documentation_fragment:
  - vmsnap.qemu._attributes
attributes:
  check_mode:
    support: full
    details:
      - The module never changes the VM or its files, so check mode makes every check a real run makes; it only
        leaves out the guest flush of O(quiesce).
  diff_mode:
    support: none
  idempotent:
    support: full
    details:
      - C(changed) is always V(false); the flush of O(quiesce) leaves the guest as it was.
  platform:
    description: The target operating system.
    support: full
    platforms: posix
options:
  vm:
    description:
      - "The VM's name, used in every message (C(VM web01: ...))."
    type: str
    required: true
  name:
    description:
      - The name the checkpoint will get (the snapshot or overlay name).
    type: str
    required: true
  socket:
    description:
      - Absolute path of the VM's QMP socket. When QEMU answers on it, the VM is running.
      - A missing socket, or one that refuses connections, means the VM is stopped; then O(disks) is needed.
      - A socket that accepts but does not answer is refused (QEMU may be alive and hold the disks).
      - At least one of O(socket) and O(disks) must be set.
    type: path
  disks:
    description:
      - The VM's image files, read when the VM is stopped (with C(qemu-img info --backing-chain)). Ignored while the
        VM runs (its disks are then read over QMP).
    type: list
    elements: path
  method:
    description:
      - V(auto) chooses V(external) for a running VM when O(can_restart=true), else V(internal); V(offline) for a
        stopped VM.
      - A method that does not fit is refused (V(offline) for a running VM, V(internal) or V(external) for a stopped
        one, V(external) without O(can_restart)).
    type: str
    choices: [auto, internal, external, offline]
    default: auto
  can_restart:
    description:
      - Whether the caller can start the VM again (the checkpoint role's C(vmsnap_vm_start) is set). Rolling back an
        external checkpoint with RAM starts a new QEMU, so V(external) needs it.
    type: bool
    default: false
  overlay_dir:
    description:
      - Folder for the overlays and the state file of an external checkpoint, as in
        M(vmsnap.qemu.qmp_live_snapshot); by default beside each disk. Ignored for the other methods.
    type: path
  max_snapshots:
    description:
      - Refuse when a disk would hold more internal snapshots than this (V(internal), V(offline)), or when its
        chain would be deeper than this (V(external)), counting the checkpoint to be taken.
    type: int
    default: 20
  warn_snapshots:
    description:
      - Warn when a disk would hold more than this, counted like O(max_snapshots).
    type: int
    default: 10
  growth_reserve_percent:
    description:
      - Free space to reserve for each disk's copy-on-write growth after the checkpoint, in percent of its virtual
        size. For V(external) it is needed where the overlay goes, otherwise beside the disk.
      - A checkpoint with RAM also needs the RAM size plus a margin (C(max(384 MiB, RAM/16))) for the state, in the
        state file's folder (V(external)) or in the first writable disk's folder (V(internal)).
    type: int
    default: 5
  quiesce:
    description:
      - V(off) does not contact the guest.
      - V(best_effort) and V(required) need the guest agent on O(guest_agent_socket) to answer C(guest-ping). When
        it answers (and not in check mode), the guest's file systems are frozen and thawed at once, so that the
        guest writes out what it has cached and the checkpoint's disks are consistent even without the RAM
        (RV(flushed)).
      - When the agent is missing or silent, V(best_effort) warns and V(required) refuses.
      - A stopped VM's disks are consistent as they are; for V(offline) the agent is not asked.
    type: str
    choices: ["off", best_effort, required]
    default: "off"
  guest_agent_socket:
    description:
      - Absolute path of the socket of the VM's qemu-guest-agent (a virtserialport named C(org.qemu.guest_agent.0)
        backed by a unix socket).
    type: path
  connect_timeout:
    description:
      - Seconds to wait for the QMP socket and the guest agent to connect and answer.
    type: float
    default: 5
notes:
  - The module must run on the hypervisor that holds the sockets and the images, as root or as the user that runs
    the VMs. Processes of other users that C(/proc) does not show are not found by the scan for open images.
  - Every warning (too many snapshots, a silent guest agent with O(quiesce=best_effort), dirty bitmaps that an
    internal rollback would trip over) is a task warning, so a registered result lists them in C(warnings).
  - The free space is summed per file system (C(st_dev)), so that disks and state file on one file system count
    together.
seealso:
  - module: vmsnap.qemu.qmp_live_snapshot
  - module: vmsnap.qemu.qcow2_snapshot
  - module: vmsnap.qemu.qemu_vm_info
"""

EXAMPLES = r"""
---
- name: Check that web01 can be checkpointed now, and how
  vmsnap.qemu.checkpoint_preflight:
    vm: web01
    name: pre-upgrade
    socket: /run/vms/web01.qmp
    disks:
      - /var/lib/vms/web01.qcow2
    can_restart: true
  register: preflight

- name: Show the method
  ansible.builtin.debug:
    msg: "{{ preflight.msg }} ({{ preflight.method }})"

- name: Flush the guest's file systems before an internal checkpoint; fail when the agent does not answer
  vmsnap.qemu.checkpoint_preflight:
    vm: db01
    name: pre-upgrade
    socket: /run/vms/db01.qmp
    method: internal
    quiesce: required
    guest_agent_socket: /run/vms/db01.qga
"""

RETURN = r"""
msg:
  description: One sentence on the outcome; on failure it starts with C(VM <vm>:) and says why.
  returned: always
  type: str
  sample: "VM web01 can be checkpointed: external checkpoint with RAM, 2 disks"
reason:
  description:
    - Why the checkpoint was refused, as a short code - V(input), V(socket), V(status), V(job), V(method), V(version),
      V(disks), V(disk), V(format), V(held), V(plan), V(snapshots), V(space), V(quiesce) or V(error).
  returned: failure
  type: str
  sample: space
method:
  description: The checkpoint method to use (V(internal), V(external) or V(offline)).
  returned: success
  type: str
  sample: external
running:
  description: Whether QEMU answered on O(socket).
  returned: success
  type: bool
  sample: true
status:
  description: The VM's QMP status, or V(stopped).
  returned: success
  type: str
  sample: running
qemu_version:
  description: QEMU's version; null for a stopped VM.
  returned: success
  type: str
  sample: 7.2.22
ram_size:
  description: The VM's RAM in bytes; null for a stopped VM.
  returned: success
  type: int
  sample: 1073741824
pid:
  description: The pid of the VM's QEMU; null for a stopped VM (or when it cannot be read).
  returned: success
  type: int
  sample: 4711
disks:
  description: The disks of the checkpoint (a running VM's writable disks, or O(disks)).
  returned: success
  type: list
  elements: dict
  contains:
    file:
      description: The disk's active image file.
      type: str
      sample: /var/lib/vms/web01.qcow2
    format:
      description: Its format.
      type: str
      sample: qcow2
    device:
      description: The drive id (null for a stopped VM or a disk added with C(-blockdev)).
      type: str
      sample: drive0
    node_name:
      description: The active node name (null for a stopped VM).
      type: str
      sample: "#block123"
    qdev:
      description: The guest device (null for a stopped VM).
      type: str
      sample: /machine/peripheral-anon/device[0]/virtio-backend
    virtual_size:
      description: The disk's size as the guest sees it, in bytes.
      type: int
      sample: 21474836480
    snapshots:
      description: Number of internal snapshots in the active image now.
      type: int
      sample: 2
    chain_depth:
      description: Number of backing files below the active image now.
      type: int
      sample: 0
    overlay:
      description: The overlay an external checkpoint uses on this disk; null for the other methods.
      type: str
      sample: /var/lib/vms/web01.vmsnap-pre-upgrade.qcow2
  sample:
    - file: /var/lib/vms/web01.qcow2
      format: qcow2
      device: drive0
      node_name: "#block123"
      qdev: /machine/peripheral-anon/device[0]/virtio-backend
      virtual_size: 21474836480
      snapshots: 0
      chain_depth: 0
      overlay: /var/lib/vms/web01.vmsnap-pre-upgrade.qcow2
state_file:
  description: The RAM state file of an external checkpoint; null for the other methods.
  returned: success
  type: str
  sample: /var/lib/vms/web01.vmsnap-pre-upgrade.vmstate
vmstate_disk:
  description: For V(internal), the disk file that will hold the RAM; null otherwise.
  returned: success
  type: str
  sample: null
exists:
  description: Whether every disk holds a checkpoint of this name already (taking it again changes nothing).
  returned: success
  type: bool
  sample: false
space:
  description:
    - Per file system that grows (C(st_dev)) - a folder on it (V(path)), V(dev), the bytes V(needed) (V(ram_state)
      plus V(growth)) and V(free) (C(f_bavail * f_frsize)).
  returned: success
  type: list
  elements: dict
  sample:
    - {path: /var/lib/vms, dev: 2049, needed: 2684354560, ram_state: 1610612736, growth: 1073741824,
       free: 107374182400}
flushed:
  description: Whether the guest's file systems were flushed (frozen and thawed) through the guest agent.
  returned: success
  type: bool
  sample: false
"""

import os
import typing as t

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import QemuImgError, ValidationError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._preflight import (
    Disk,
    Preflight,
    PreflightRefusal,
    PreflightRequest,
    bitmap_warnings,
    check_counts,
    connect,
    decide_method,
    disk_from_image,
    files_to_scan,
    find_holders,
    flush,
    open_agent,
    plan_running,
    plan_stopped,
    read_running,
    refuse_formats,
    refuse_holders,
    refuse_in_use,
    refuse_jobs,
    refuse_old_qemu,
    refuse_short,
    refuse_status,
    refuse_unreachable,
    space_needs,
    stopped_view,
    sum_space,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient
from ansible_collections.vmsnap.qemu.plugins.module_utils._validate import validate_image_path, validate_snapshot_name

ARGUMENT_SPEC: dict[str, t.Any] = dict(
    vm=dict(type="str", required=True),
    name=dict(type="str", required=True),
    socket=dict(type="path"),
    disks=dict(type="list", elements="path"),
    method=dict(type="str", default="auto", choices=["auto", "internal", "external", "offline"]),
    can_restart=dict(type="bool", default=False),
    overlay_dir=dict(type="path"),
    max_snapshots=dict(type="int", default=20),
    warn_snapshots=dict(type="int", default=10),
    growth_reserve_percent=dict(type="int", default=5),
    quiesce=dict(type="str", default="off", choices=["off", "best_effort", "required"]),
    guest_agent_socket=dict(type="path"),
    connect_timeout=dict(type="float", default=5.0),
)


def main() -> t.NoReturn:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    vm = params["vm"]
    result: dict[str, t.Any] = dict(changed=False)
    qmp: QmpClient | None = None
    try:
        request = _request(params)
        qmp = connect(vm, params["socket"], params["connect_timeout"])
        preflight = _plan(module, request, qmp)
        if qmp is not None:
            qmp.close()
        result.update(_finish(module, preflight))
    except PreflightRefusal as exc:
        exc.do_fail(module, **result)
    except VmsnapError as exc:
        exc.msg = f"VM {vm}: {exc.msg}"
        exc.details.setdefault("reason", "error")
        exc.do_fail(module, **result)
    finally:
        if qmp is not None:
            qmp.close()
    module.exit_json(**result)


def _request(params: dict[str, t.Any]) -> PreflightRequest:
    vm = params["vm"]
    if not vm or not vm.strip():
        raise PreflightRefusal("(unnamed)", "input", "vm must name the VM.")
    try:
        name = validate_snapshot_name(params["name"])
        for option in ("socket", "guest_agent_socket"):
            if params[option] is not None:
                validate_image_path(params[option], must_exist=False, what="Socket")
        for disk in params["disks"] or []:
            validate_image_path(disk, must_exist=False)
        if params["overlay_dir"] is not None:
            validate_image_path(params["overlay_dir"], must_exist=False, what="Overlay folder")
            if not os.path.isdir(params["overlay_dir"]):
                raise ValidationError(f"Overlay folder {params['overlay_dir']} does not exist or is not a folder.")
    except ValidationError as exc:
        raise PreflightRefusal(vm, "input", exc.msg) from None
    if params["max_snapshots"] < 1 or params["warn_snapshots"] < 0 or params["growth_reserve_percent"] < 0:
        raise PreflightRefusal(
            vm, "input", "max_snapshots must be 1 or more, warn_snapshots and growth_reserve_percent 0 or more."
        )
    if params["connect_timeout"] <= 0:
        raise PreflightRefusal(vm, "input", "connect_timeout must be a positive number of seconds.")
    return PreflightRequest(
        vm=vm,
        name=name,
        method=params["method"],
        can_restart=params["can_restart"],
        overlay_dir=params["overlay_dir"],
        max_snapshots=params["max_snapshots"],
        warn_snapshots=params["warn_snapshots"],
        growth_reserve_percent=params["growth_reserve_percent"],
        quiesce=params["quiesce"],
    )


def _plan(module: AnsibleModule, request: PreflightRequest, qmp: QmpClient | None) -> Preflight:
    """Steps 1 to 4: running or stopped, status and jobs, method, disks."""
    vm = request.vm
    if qmp is not None:
        view = read_running(qmp)
        refuse_status(vm, view.status)
        refuse_jobs(vm, view.jobs)
        method = decide_method(vm, request.method, True, request.can_restart)
        refuse_old_qemu(vm, method, view.version)
        refuse_formats(vm, method, view.disks)
        return plan_running(request, view, method)
    if not module.params["disks"]:
        refuse_unreachable(vm, module.params["socket"])
    decide_method(vm, request.method, False, request.can_restart)
    view = stopped_view(_read_images(module, vm, module.params["disks"]))
    refuse_formats(vm, "offline", view.disks)
    return plan_stopped(request, view)


def _read_images(module: AnsibleModule, vm: str, paths: list[str]) -> list[Disk]:
    qemu_img = QemuImg(module)
    disks: list[Disk] = []
    seen: dict[str, str] = {}
    for path in paths:
        if not os.path.exists(path):
            raise PreflightRefusal(vm, "disk", f"its disk image {path} does not exist.", disk=path)
        real = os.path.realpath(path)
        if real in seen:
            raise PreflightRefusal(vm, "input", f"disks names {real} twice ({seen[real]} and {path}).")
        seen[real] = path
        try:
            validate_image_path(path)
            info = qemu_img.info(path, backing_chain=True)
        except (ValidationError, QemuImgError) as exc:
            raise PreflightRefusal(vm, "disk", f"cannot read its disk {path}: {exc.msg}", disk=path) from None
        refuse_in_use(vm, path, info)
        if info.top.corrupt:
            raise PreflightRefusal(
                vm, "disk", f"its disk {path} is marked corrupt; repair it with qemu-img check -r first.", disk=path
            )
        disks.append(disk_from_image(path, info))
    return disks


def _finish(module: AnsibleModule, preflight: Preflight) -> dict[str, t.Any]:
    """Steps 5 to 8: other processes, counts, space, quiesce; then the result."""
    request, view = preflight.request, preflight.view
    exclude = {pid for pid in (view.pid, os.getpid()) if pid is not None}
    refuse_holders(request.vm, find_holders(files_to_scan(preflight), exclude))
    preflight.warnings.extend(check_counts(preflight))
    space = sum_space(space_needs(preflight))
    refuse_short(request.vm, preflight.method, space)
    preflight.warnings.extend(bitmap_warnings(preflight))
    agent = open_agent(preflight, module.params["guest_agent_socket"], module.params["connect_timeout"])
    flushed = False
    if agent is not None:
        try:
            if not module.check_mode:
                flushed = flush(preflight, agent)
        finally:
            agent.close()
    for warning in preflight.warnings:
        module.warn(warning)
    return dict(
        msg=preflight.message(),
        method=preflight.method,
        running=view.running,
        status=view.status,
        qemu_version=view.qemu_version,
        ram_size=view.ram_size,
        pid=view.pid,
        disks=[disk.result() for disk in view.disks],
        state_file=preflight.state_file,
        vmstate_disk=preflight.vmstate_disk,
        exists=preflight.exists,
        space=space,
        flushed=flushed,
    )


if __name__ == "__main__":
    main()
