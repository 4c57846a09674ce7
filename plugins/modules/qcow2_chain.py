#!/usr/bin/python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: qcow2_chain
short_description: Create, delete, commit, flatten and rebase qcow2 overlays (external snapshots) offline
version_added: 0.1.0
description:
  - Manages external snapshots of images that no running QEMU holds. An overlay is a qcow2 file whose
    backing file is the older image; the guest sees the overlay's data over the backing file's.
  - Images held by a running QEMU are refused with a pointer to M(vmsnap.qemu.qmp_live_snapshot).
  - Overlays are always created with an explicit backing format (C(-F)), which qemu-img requires since 6.1.
author:
  - vmsnap.qemu contributors (@vmsnap)
extends_documentation_fragment:
  - vmsnap.qemu._attributes
  - vmsnap.qemu._attributes.ACTIONGROUP_IMAGE
  - vmsnap.qemu._image_lock
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows the chain (top first) before and after.
  idempotent:
    support: full
options:
  path:
    description:
      - Absolute path of the overlay, that is the top image of the chain.
    type: path
    required: true
  backing:
    description:
      - Absolute path of the backing image.
      - Required for O(state=present) and O(state=rebased). For O(state=absent) and O(state=committed) it is
        optional and, when given, must be the overlay's current backing file.
      - Any format qemu-img reads works, raw included; its format is detected and stored in the overlay.
    type: path
  state:
    description:
      - V(present) creates O(path) as an overlay on O(backing), unless it already is one. The new file gets
        O(backing)'s permission bits plus write permission for the owner (a read-only golden image still gives a
        writable overlay), and, when the task runs as root, O(backing)'s owner and group; they are set explicitly
        so the umask does not cut them. It is created exclusively; a file or symlink that appears at O(path) makes
        the task fail without following it. C(qemu-img) writes it in a private folder beside O(path) and it gets
        its name with a hard link, so the file system of O(path) must support hard links (vfat, exFAT and some
        FUSE or CIFS mounts do not; the task then fails and changes nothing).
      - V(absent) deletes the overlay O(path). It refuses standalone images and overlays that other images in
        O(search_dirs) use as their backing file.
      - V(committed) writes O(path)'s data into its backing file (C(qemu-img commit)) and then removes O(path),
        unless O(keep=true). When O(path) is already gone and O(backing) exists, nothing is done, with a warning
        naming both paths (a typo in O(path) would look the same).
      - V(flattened) makes O(path) a standalone image with the same guest-visible content and no backing file.
      - V(rebased) points O(path) at the new O(backing) while keeping its guest-visible content (safe rebase),
        or only rewrites the header with O(unsafe=true).
    type: str
    choices: [present, absent, committed, flattened, rebased]
    default: present
  size:
    description:
      - Virtual size of a new overlay, such as V(40G). Default is the backing image's size.
    type: str
  max_depth:
    description:
      - Refuse to create or rebase an overlay whose chain would have more backing files than this.
      - Each level costs a lookup on reads that miss the upper layers.
    type: int
    default: 10
  search_dirs:
    description:
      - Folders (not searched recursively) whose images are checked for using O(path) (or, for O(state=committed),
        its backing file) as their backing file.
      - Default is the folder of O(path).
    type: list
    elements: path
  keep:
    description:
      - With O(state=committed), keep O(path) after the commit. qemu-img then empties it, so it stays a valid,
        empty overlay; a later run finds nothing left to commit.
    type: bool
    default: false
  force:
    description:
      - With O(state=committed), commit even when other images in O(search_dirs) use the same backing file.
        They will see the committed data from then on.
      - With O(state=absent) and O(state=committed), go on (with a warning) when images in O(search_dirs) could
        not be read to find their backing file; without it they count as possible dependants and the task is
        refused. With O(state=absent), images known to use O(path) are always refused.
    type: bool
    default: false
  compress:
    description:
      - With O(state=flattened), write compressed clusters (C(qemu-img convert -c)).
    type: bool
    default: false
  unsafe:
    description:
      - With O(state=rebased), only change the backing file name in the header (C(qemu-img rebase -u)). Use it
        when the new backing file has the same content as the old one, for example after moving it.
    type: bool
    default: false
  verify:
    description:
      - With O(state=flattened), compare the new image with the chain (C(qemu-img compare)) before it replaces
        O(path). This reads both in full; turn it off to halve the time on very large images.
    type: bool
    default: true
notes:
  - O(state=flattened) is crash-safe. It writes the complete image into a temporary file beside O(path)
    (in a private folder C(.NAME.vmsnap-flatten.tmp), mode 0700), verifies it, syncs it and renames it over
    O(path) in one step. If the task is interrupted at any moment, O(path) is either the old overlay with its
    chain or the complete new image; a leftover temporary folder is removed by the next run. The new image keeps
    O(path)'s mode (and, as root, owner).
  - O(state=committed) writes into the backing file in place, as C(qemu-img commit) does. If it is interrupted,
    O(path) is untouched and the chain O(path) over its backing file still reads exactly the new data, because
    O(path)'s clusters hide the ones already copied. The backing file alone may then hold part of O(path)'s
    data; run the task again to finish the commit. Do not use the backing file on its own, nor delete O(path),
    until a run has succeeded.
  - The per-image lock is taken on O(path).
requirements:
  - C(qemu-img) (Debian/Ubuntu package C(qemu-utils)) on the target host.
seealso:
  - module: vmsnap.qemu.qcow2_info
  - module: vmsnap.qemu.qcow2_snapshot
"""

EXAMPLES = r"""
---
- name: Give each test run a throwaway overlay on the golden image
  vmsnap.qemu.qcow2_chain:
    path: /var/lib/vms/ci-run-17.qcow2
    backing: /var/lib/vms/golden.qcow2

- name: Throw the overlay away after the run
  vmsnap.qemu.qcow2_chain:
    path: /var/lib/vms/ci-run-17.qcow2
    state: absent

- name: Disk-only checkpoint before an upgrade, VM stopped
  vmsnap.qemu.qcow2_chain:
    path: /var/lib/vms/db01-pre-upgrade.qcow2
    backing: /var/lib/vms/db01.qcow2

- name: The upgrade went well - merge the overlay back into the base
  vmsnap.qemu.qcow2_chain:
    path: /var/lib/vms/db01-pre-upgrade.qcow2
    backing: /var/lib/vms/db01.qcow2
    state: committed

- name: Make a clone independent of its golden image
  vmsnap.qemu.qcow2_chain:
    path: /var/lib/vms/web02.qcow2
    state: flattened

- name: Point an overlay at the golden image's new location
  vmsnap.qemu.qcow2_chain:
    path: /var/lib/vms/web02.qcow2
    backing: /srv/images/golden.qcow2
    state: rebased
    unsafe: true
"""

RETURN = r"""
chain:
  description:
    - The image files of the chain after the task, top first (in check mode, the predicted chain).
    - Empty when O(path) no longer exists and no O(backing) was given.
  returned: always
  type: list
  elements: str
  sample: [/var/lib/vms/ci-run-17.qcow2, /var/lib/vms/golden.qcow2]
chain_depth:
  description: Number of backing files below the top of RV(chain).
  returned: always
  type: int
  sample: 1
dependants:
  description: Images in O(search_dirs) that use the checked image as their backing file (see O(search_dirs)).
  returned: for O(state=absent) and O(state=committed)
  type: list
  elements: str
  sample: []
unreadable:
  description:
    - Images in O(search_dirs) whose backing file could not be read (see O(force)).
  returned: for O(state=absent) and O(state=committed)
  type: list
  elements: str
  sample: []
bytes_moved:
  description:
    - For O(state=committed), the bytes of guest data O(path) held (data and zeroes) and wrote into the backing file.
    - For O(state=flattened), the bytes the new image takes on disk.
    - V(0) when nothing was done, and in check mode.
  returned: for O(state=committed) and O(state=flattened)
  type: int
  sample: 1073741824
seconds:
  description: Seconds the commit or flatten took (V(0) when nothing was done, and in check mode).
  returned: for O(state=committed) and O(state=flattened)
  type: float
  sample: 4.21
"""

import contextlib
import os
import typing as t

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmsnap.qemu.plugins.module_utils._chain import (
    CREATE_SUFFIX,
    TEMP_SUFFIX,
    ChainPlan,
    ChainRequest,
    Outcome,
    execute_chain,
    plan_chain,
    validate_size,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._files import remove_private_folder
from ansible_collections.vmsnap.qemu.plugins.module_utils._lock import image_locks
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
from ansible_collections.vmsnap.qemu.plugins.module_utils._validate import validate_image_path

ARGUMENT_SPEC: dict[str, t.Any] = dict(
    path=dict(type="path", required=True),
    backing=dict(type="path"),
    state=dict(type="str", default="present", choices=["present", "absent", "committed", "flattened", "rebased"]),
    size=dict(type="str"),
    max_depth=dict(type="int", default=10),
    search_dirs=dict(type="list", elements="path"),
    keep=dict(type="bool", default=False),
    force=dict(type="bool", default=False),
    compress=dict(type="bool", default=False),
    unsafe=dict(type="bool", default=False),
    verify=dict(type="bool", default=True),
    lock_timeout=dict(type="float", default=60.0),
)


def _remove_finished_runs_folders(path: str) -> None:
    """A run killed after its change but before removing its private folder left it; nothing else would remove it
    once the image is as requested (a run that changes something replaces it anyway)."""
    for image in dict.fromkeys((path, os.path.realpath(path))):
        for suffix in (TEMP_SUFFIX, CREATE_SUFFIX):
            # Another user's folder at that name is not ours to remove, and no reason to fail a run that is done.
            with contextlib.suppress(VmsnapError, OSError):
                remove_private_folder(os.path.join(os.path.dirname(image), f".{os.path.basename(image)}{suffix}"))


def main() -> t.NoReturn:
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        required_if=[("state", "present", ("backing",)), ("state", "rebased", ("backing",))],
        supports_check_mode=True,
    )
    params = module.params
    try:
        path = validate_image_path(params["path"], must_exist=False)
        backing = params["backing"]
        if backing is not None:
            validate_image_path(backing, must_exist=False, what="Backing")
        search_dirs = [
            validate_image_path(folder, must_exist=False, what="Folder") for folder in params["search_dirs"] or []
        ]
        request = ChainRequest(
            path=path,
            state=params["state"],
            backing=backing,
            size=validate_size(params["size"]),
            max_depth=params["max_depth"],
            search_dirs=search_dirs or [os.path.dirname(path)],
            keep=params["keep"],
            force=params["force"],
        )
        qemu_img = QemuImg(module)
        outcome = Outcome()
        if module.check_mode:
            plan = plan_chain(qemu_img, request)
        else:
            with image_locks([path], timeout=params["lock_timeout"]):
                plan = plan_chain(qemu_img, request)
                if not plan.changed:
                    _remove_finished_runs_folders(path)
                if plan.changed:
                    outcome = execute_chain(
                        qemu_img,
                        plan,
                        keep=params["keep"],
                        compress=params["compress"],
                        unsafe=params["unsafe"],
                        verify=params["verify"],
                    )
                    if plan.state != "absent":
                        plan.chain_after = _read_chain_after(qemu_img, plan, backing or plan.backing)
    except VmsnapError as exc:
        exc.do_fail(module, changed=False)
    for warning in plan.warnings:
        module.warn(warning)

    result: dict[str, t.Any] = dict(
        changed=plan.changed, chain=plan.chain_after, chain_depth=max(len(plan.chain_after) - 1, 0)
    )
    if params["state"] in ("absent", "committed"):
        result.update(dependants=plan.dependants, unreadable=plan.unreadable)
    if params["state"] in ("committed", "flattened"):
        result.update(bytes_moved=outcome.bytes_moved, seconds=outcome.seconds)
    if module._diff:
        result["diff"] = dict(before={"chain": plan.chain_before}, after={"chain": plan.chain_after})
    module.exit_json(**result)


def _read_chain_after(qemu_img: QemuImg, plan: ChainPlan, backing: str | None) -> list[str]:
    """The chain as it is now; the change is done, so a failure here still reports changed."""
    try:
        top = plan.path if os.path.exists(plan.path) else backing
        if top is None or not os.path.exists(top):
            return []
        return qemu_img.info(top, backing_chain=True).filenames()
    except VmsnapError as exc:
        raise VmsnapError(
            f"The {plan.action} of {plan.path} is done, but reading the chain afterwards failed: {exc.msg}",
            changed=True,
        ) from None


if __name__ == "__main__":
    main()
