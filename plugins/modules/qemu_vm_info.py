#!/usr/bin/python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_vm_info
short_description: Read running QEMU VMs over their QMP sockets - status, disks, chains, snapshots, bitmaps, jobs
version_added: 0.1.0
description:
  - Connects to one QMP socket (O(socket)) or to every socket matching O(sockets_glob) and reports, per VM, its run
    status, its QEMU version, its attached disks and the block jobs it runs.
  - This is what a fleet-wide playbook uses to discover what a live checkpoint must cover.
  - Only queries are sent (C(query-status), C(query-block), C(query-jobs)); nothing is changed.
author:
  - vmsnap.qemu contributors (@vmsnap)
extends_documentation_fragment:
  - vmsnap.qemu._attributes
  - vmsnap.qemu._attributes.INFO_MODULE
  - vmsnap.qemu._attributes.ACTIONGROUP_QMP
  - vmsnap.qemu._vm_lock
options:
  socket:
    description:
      - Absolute path of a VM's QMP socket (C(-qmp unix:PATH,server=on,wait=off)).
      - Mutually exclusive with O(sockets_glob); one of them is required.
    type: path
  sockets_glob:
    description:
      - A shell glob of QMP socket paths, such as V(/run/qemu/*.qmp). Every match is read.
      - A VM that cannot be read is listed with RV(vms[].error) and a warning, and the others are still read.
    type: str
  connect_timeout:
    description: Seconds to wait for each socket to accept and greet, and for each query to be answered.
    type: float
    default: 5
notes:
  - QEMU serves one QMP client at a time. This module waits its turn behind other vmsnap.qemu tasks on the same VM
    (O(lock_timeout)); a VM whose monitor is held by another client (libvirt, C(socat)) does not greet, which
    shows up as an error saying that another client probably holds the socket.
requirements:
  - Python 3.9 or newer on the host; no QEMU tools are needed, only access to the sockets.
seealso:
  - module: vmsnap.qemu.qcow2_info
"""

EXAMPLES = r"""
---
- name: Read one VM
  vmsnap.qemu.qemu_vm_info:
    socket: /run/qemu/web01.qmp
  register: web01

- name: Show which disks a live checkpoint of web01 must cover
  ansible.builtin.debug:
    msg: "{{ web01.vms[0].block_devices | selectattr('writable') | map(attribute='node_name') | list }}"

- name: Read every VM on the hypervisor
  vmsnap.qemu.qemu_vm_info:
    sockets_glob: /run/qemu/*.qmp
  register: fleet
"""

RETURN = r"""
vms:
  description: One entry per socket, in sorted order of the socket paths.
  returned: always
  type: list
  elements: dict
  contains:
    socket:
      description: The QMP socket.
      type: str
      sample: /run/qemu/web01.qmp
    error:
      description: Why this VM could not be read (only with O(sockets_glob); with O(socket) the task fails).
      returned: when the VM could not be read
      type: str
      sample: "QEMU closed the QMP connection /run/qemu/web02.qmp while we waited for the QMP greeting."
    status:
      description:
        - The run state from C(query-status), for example V(running), V(paused), V(postmigrate) or V(restore-vm).
      type: str
      sample: running
    running:
      description: Whether the guest's CPUs run.
      type: bool
      sample: true
    qemu_version:
      description: QEMU's version, from the QMP greeting.
      type: str
      sample: 7.2.22
    block_devices:
      description: The attached disks (drives without a medium are left out).
      type: list
      elements: dict
      contains:
        device:
          description: The drive id (C(-drive id=)), or V(null) for disks attached with C(-blockdev) only.
          type: str
          sample: drive0
        qdev:
          description: The guest device's path or id.
          type: str
          sample: /machine/peripheral-anon/device[0]/virtio-backend
        node_name:
          description: Node name of the active layer, the name that QMP snapshot commands take.
          type: str
          sample: disk0
        file:
          description: The active layer's file.
          type: str
          sample: /var/lib/vms/web01.qcow2
        format:
          description: The active layer's format driver.
          type: str
          sample: qcow2
        writable:
          description: Whether the VM can write the disk.
          type: bool
          sample: true
        chain:
          description: The active layer and its backing files, top first, as M(vmsnap.qemu.qcow2_info) lists a chain.
          type: list
          elements: dict
          sample:
            - {filename: /var/lib/vms/web01.qcow2, format: qcow2, virtual_size: 21474836480, actual_size: 200704,
               backing_file: /var/lib/vms/golden.qcow2, backing_format: qcow2}
        chain_depth:
          description: Number of backing files below the active layer.
          type: int
          sample: 1
        snapshots:
          description: Internal snapshots of the active layer, with the keys that M(vmsnap.qemu.qcow2_info) returns.
          type: list
          elements: dict
          sample: []
        bitmaps:
          description: Dirty bitmaps on the active layer (name, recording, persistent, busy, granularity, count).
          type: list
          elements: dict
          sample: [{name: bm0, recording: true, persistent: true, busy: false, granularity: 65536, count: 0}]
    jobs:
      description: Jobs the VM runs, block jobs included (id, type, status, current_progress, total_progress, error).
      type: list
      elements: dict
      sample:
        - {id: commit0, type: commit, status: ready, current_progress: 1048576, total_progress: 1048576, error: null}
"""

import glob
import typing as t

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient
from ansible_collections.vmsnap.qemu.plugins.module_utils._validate import validate_image_path
from ansible_collections.vmsnap.qemu.plugins.module_utils._vm import describe_vm


def main() -> t.NoReturn:
    module = AnsibleModule(
        argument_spec=dict(
            socket=dict(type="path"),
            sockets_glob=dict(type="str"),
            connect_timeout=dict(type="float", default=5.0),
            lock_timeout=dict(type="float", default=60.0),
        ),
        mutually_exclusive=[("socket", "sockets_glob")],
        required_one_of=[("socket", "sockets_glob")],
        supports_check_mode=True,
    )
    timeout = module.params["connect_timeout"]
    lock_timeout = module.params["lock_timeout"]
    vms = []
    try:
        if module.params["socket"] is not None:
            path = validate_image_path(module.params["socket"], must_exist=False, what="Socket")
            vms.append(_read(path, timeout, lock_timeout))
        else:
            for path in sorted(
                glob.glob(validate_image_path(module.params["sockets_glob"], must_exist=False, what="Socket glob"))
            ):
                try:
                    vms.append(_read(path, timeout, lock_timeout))
                except VmsnapError as exc:
                    module.warn(f"Could not read the VM at {path}: {exc.msg}")
                    vms.append({"socket": path, "error": exc.msg})
    except VmsnapError as exc:
        exc.do_fail(module)
    module.exit_json(changed=False, vms=vms)


def _read(path: str, timeout: float, lock_timeout: float) -> dict[str, t.Any]:
    with QmpClient(path, connect_timeout=timeout, command_timeout=timeout, lock_timeout=lock_timeout) as qmp:
        return dict(socket=path, **describe_vm(qmp))


if __name__ == "__main__":
    main()
