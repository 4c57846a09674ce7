#!/usr/bin/python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: qcow2_info
short_description: Read a QEMU disk image, its backing chain, internal snapshots and bitmaps
version_added: 0.1.0
description:
  - Reads an image with C(qemu-img info --output=json), by default with its whole backing chain, and returns
    a parsed model of it.
  - Works on images held by a running QEMU. Such an image is read with C(--force-share) and reported with
    RV(image.in_use=true); nothing is ever written.
  - Any format that C(qemu-img) reads is accepted, so raw backing files can be inspected too; only qcow2
    images have internal snapshots and bitmaps.
author:
  - vmsnap.qemu contributors (@vmsnap)
extends_documentation_fragment:
  - vmsnap.qemu._attributes
  - vmsnap.qemu._attributes.INFO_MODULE
  - vmsnap.qemu._attributes.ACTIONGROUP_IMAGE
options:
  path:
    description:
      - Absolute path of the image file (or block device) on the target host.
      - QEMU pseudo-paths such as C(json:{...}) and relative paths are refused.
    type: path
    required: true
  backing_chain:
    description:
      - Also read every backing file below the image, so that RV(image.chain) lists the whole chain.
      - When V(false), RV(image.chain) holds only the image itself.
    type: bool
    default: true
  check:
    description:
      - Also run C(qemu-img check) and return its findings as RV(image.check).
      - On an image in use by a running QEMU the check runs with C(--force-share) and may report
        transient inconsistencies, because the image changes while it is read.
    type: bool
    default: false
  search_dirs:
    description:
      - Also list, as RV(image.dependants), the images in these folders (not searched recursively) that use
        O(path) as their backing file, so that you can see what relies on an image before deleting it.
    type: list
    elements: path
notes:
  - Every C(qemu-img) call has a time limit, so that a hung file system (an NFS server that stopped
    answering) cannot block the task forever. C(qemu-img info) gets 300 seconds; C(qemu-img check) gets
    3600 seconds plus one second per 5 MiB of the image (the larger of file size and virtual size). A call
    that runs longer is killed and the task fails with a message naming the command,
    the image and the seconds.
requirements:
  - C(qemu-img) (Debian/Ubuntu package C(qemu-utils)) on the target host.
seealso:
  - module: vmsnap.qemu.qcow2_snapshot
"""

EXAMPLES = r"""
---
- name: Read an image and its backing chain
  vmsnap.qemu.qcow2_info:
    path: /var/lib/vms/web01.qcow2
  register: web01_disk

- name: Fail early when the image is held by a running VM
  ansible.builtin.assert:
    that: not web01_disk.image.in_use
    fail_msg: "web01 is running; use vmsnap.qemu.qmp_live_snapshot instead"

- name: Show internal snapshot names
  ansible.builtin.debug:
    msg: "{{ web01_disk.image.snapshots | map(attribute='name') | list }}"

- name: See which overlays in the folder rely on the golden image
  vmsnap.qemu.qcow2_info:
    path: /var/lib/vms/golden.qcow2
    backing_chain: false
    search_dirs: [/var/lib/vms]
  register: golden

- name: Check the image for corruption and leaks
  vmsnap.qemu.qcow2_info:
    path: /var/lib/vms/web01.qcow2
    check: true
  register: web01_check
  failed_when: web01_check.image.check.rc == 2
"""

RETURN = r"""
image:
  description: The image, as read by C(qemu-img info).
  returned: success
  type: dict
  contains:
    filename:
      description: The image's file name, as given.
      type: str
      sample: /var/lib/vms/web01.qcow2
    format:
      description: The image format that C(qemu-img) detected.
      type: str
      sample: qcow2
    virtual_size:
      description: Size of the disk that the guest sees, in bytes.
      type: int
      sample: 21474836480
    actual_size:
      description: Space the image file takes on the host, in bytes.
      type: int
      sample: 1339392
    cluster_size:
      description: qcow2 cluster size in bytes; V(null) for formats without clusters.
      type: int
      sample: 65536
    dirty:
      description: Whether the image's dirty flag is set (lazy refcounts, image not closed cleanly).
      type: bool
      sample: false
    corrupt:
      description: Whether QEMU has marked the qcow2 image corrupt.
      type: bool
      sample: false
    backing_file:
      description: The backing file name as stored in the image header, or V(null).
      type: str
      sample: base.qcow2
    full_backing_file:
      description: The backing file name resolved against the image's folder, or V(null).
      type: str
      sample: /var/lib/vms/base.qcow2
    backing_format:
      description: The backing file's format as stored in the header, or V(null).
      type: str
      sample: qcow2
    chain:
      description: The image and its backing files, top first. Holds only the image when O(backing_chain=false).
      type: list
      elements: dict
      sample:
        - {filename: /var/lib/vms/web01.qcow2, format: qcow2, virtual_size: 21474836480, actual_size: 200704,
           backing_file: base.qcow2, backing_format: qcow2}
        - {filename: /var/lib/vms/base.qcow2, format: qcow2, virtual_size: 21474836480, actual_size: 1339392,
           backing_file: null, backing_format: null}
    chain_depth:
      description: Number of backing files below the image (V(0) for a standalone image).
      type: int
      sample: 1
    snapshots:
      description: Internal snapshots of the image (not of its backing files), in the order qemu-img lists them.
      type: list
      elements: dict
      contains:
        id:
          description: QEMU's snapshot ID (a number, as a string).
          type: str
        name:
          description: The snapshot's tag.
          type: str
        vm_state_size:
          description: Bytes of saved VM (RAM and device) state; V(0) for disk-only snapshots.
          type: int
        date:
          description: Creation time, ISO 8601 in UTC.
          type: str
        date_epoch:
          description: Creation time in seconds since the epoch.
          type: float
        vm_clock:
          description: The guest's clock when the snapshot was taken, in seconds.
          type: float
      sample:
        - {id: "1", name: pre-upgrade, vm_state_size: 0, date: "2026-11-27T14:29:35Z", date_epoch: 1795789775.83,
           vm_clock: 0.0}
    bitmaps:
      description: Persistent dirty bitmaps stored in the image.
      type: list
      elements: dict
      sample:
        - {name: bm0, granularity: 65536, flags: [auto]}
    in_use:
      description:
        - Whether a running QEMU holds the image in a way that forbids writing it, detected through QEMU's own
          image locks - it writes the image, or it uses it read-only without sharing writes.
        - A backing file that a running VM reads is also in use in this sense.
      type: bool
      sample: false
    dependants:
      description: Images in O(search_dirs) whose backing file is O(path).
      returned: when O(search_dirs) is given
      type: list
      elements: str
      sample: [/var/lib/vms/ci-run-17.qcow2, /var/lib/vms/ci-run-18.qcow2]
    check:
      description:
        - Result of C(qemu-img check --output=json), as qemu-img prints it (keys with dashes), plus its exit code.
      returned: when O(check=true)
      type: dict
      contains:
        rc:
          description: Exit code of C(qemu-img check). V(0) clean, V(2) corruptions found, V(3) leaked clusters only.
          type: int
          sample: 0
        check-errors:
          description: Errors that prevented the check from completing.
          type: int
          sample: 0
      sample: {filename: /var/lib/vms/web01.qcow2, format: qcow2, check-errors: 0, image-end-offset: 1703936,
               total-clusters: 1024, allocated-clusters: 16, rc: 0}
"""

import typing as t

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmsnap.qemu.plugins.module_utils._chain import find_dependants
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
from ansible_collections.vmsnap.qemu.plugins.module_utils._validate import validate_image_path


def main() -> t.NoReturn:
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            backing_chain=dict(type="bool", default=True),
            check=dict(type="bool", default=False),
            search_dirs=dict(type="list", elements="path"),
        ),
        supports_check_mode=True,
    )
    try:
        path = validate_image_path(module.params["path"])
        qemu_img = QemuImg(module)
        info = qemu_img.info(path, backing_chain=module.params["backing_chain"])
        image = info.as_dict()
        if module.params["check"]:
            image["check"] = qemu_img.check(path, force_share=info.in_use)
        if module.params["search_dirs"] is not None:
            folders = [
                validate_image_path(folder, must_exist=False, what="Folder") for folder in module.params["search_dirs"]
            ]
            image["dependants"] = find_dependants(qemu_img, path, folders)
    except VmsnapError as exc:
        exc.do_fail(module)
    module.exit_json(changed=False, image=image)


if __name__ == "__main__":
    main()
