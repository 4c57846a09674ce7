#!/usr/bin/python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: qcow2_snapshot
short_description: Create, delete, revert and prune internal snapshots of offline qcow2 images
version_added: 0.1.0
description:
  - Manages internal snapshots of qcow2 images with C(qemu-img snapshot), for VMs that are shut down.
  - Images held by a running QEMU are detected and refused with a pointer to M(vmsnap.qemu.qmp_live_snapshot).
  - With O(paths), one task snapshots every disk of a VM all-or-nothing; one task over many paths is also
    far faster than a loop of tasks (see C(docs/performance.md)).
  - Snapshot names are tags. Purely numeric names are refused, because C(qemu-img snapshot -a) matches
    IDs before tags; names that several snapshots share are refused for O(state=absent) and
    O(state=reverted), listing their IDs.
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
      - The diff shows each image's snapshot names before and after.
  idempotent:
    support: partial
    details:
      - O(state=reverted) always reports a change, because it always rewrites the image's active state.
      - O(state=present), O(state=absent) and O(state=pruned) are idempotent.
options:
  path:
    description:
      - Absolute path of one qcow2 image.
      - Mutually exclusive with O(paths); one of them is required.
    type: path
  paths:
    description:
      - Absolute paths of several qcow2 images, normally all disks of one VM, handled as one checkpoint.
      - For O(state=present) the task is all-or-nothing. If creating the snapshot fails on any disk, the
        snapshots this task already created on the other disks are deleted again and the task fails.
      - Every image is read and checked before any is changed. Deleting and reverting cannot be undone
        once done; if one of those fails midway, the error lists the images already changed.
    type: list
    elements: path
  name:
    description:
      - The snapshot's name (tag).
      - Required unless O(state=pruned).
      - Must not be empty, purely numeric, longer than 255 bytes or contain control characters.
    type: str
  backup_bitmaps:
    description:
      - What O(state=reverted) does about dirty bitmaps on an image. QEMU cannot revert an internal snapshot while
        the image has any dirty bitmap, and M(vmsnap.qemu.qcow2_backup) keeps one on every disk it backs up
        (named C(vmsnap-backup-<set>-<chain>)).
      - V(fail) refuses the revert and names each bitmap - the backup set it belongs to, or another tool.
      - V(drop) removes the backup bitmaps of M(vmsnap.qemu.qcow2_backup) (C(qemu-img bitmap --remove)) right
        before the snapshot is applied, and warns, naming the backup sets. The next M(vmsnap.qemu.qcow2_backup) run
        of each such set finds its bitmap gone and takes a full backup. In check mode the task reports what it
        would remove (RV(dropped_bitmaps)).
      - A bitmap of any other tool always fails the task, with the image left as it was.
      - Ignored for the other states; V(drop) with them is refused.
    type: str
    choices: [fail, drop]
    default: fail
  state:
    description:
      - V(present) creates the snapshot when no snapshot of that name exists.
      - V(absent) deletes it when it exists.
      - V(reverted) applies it, so the image's data returns to the snapshot. Fails when it does not exist.
      - V(pruned) only applies O(retention).
    type: str
    choices: [present, absent, reverted, pruned]
    default: present
  retention:
    description:
      - Deletes old snapshots after O(state=present), or alone with O(state=pruned).
      - Only snapshots whose names match O(retention.match) are ever considered. The snapshot named
        O(name) is never pruned by the task that keeps it present; when the task creates it, it counts as
        the newest matching snapshot, taken now, towards O(retention.keep) and the period rules.
      - The count rules O(retention.keep), O(retention.keep_daily), O(retention.keep_weekly) and
        O(retention.keep_monthly) work as Proxmox Backup Server's prune does. They are applied in that order,
        each over the matching snapshots newest first. A rule skips periods that already hold a snapshot
        an earlier rule kept, and keeps the newest snapshot of each new period until it has its number of
        periods, so each rule counts only its own periods. A matching snapshot that no count rule keeps is
        deleted. Days, ISO 8601 weeks (Monday to Sunday) and months are taken in UTC.
      - O(retention.max_age) deletes matching snapshots older than it, also those a count rule keeps. With
        O(retention.max_age) alone, every matching snapshot younger than it stays.
      - The newest matching snapshot is never deleted, unless every count rule given is V(0) (for example
        O(retention.keep=0)), which deletes every matching snapshot.
      - The filter P(vmsnap.qemu.retention_select#filter) applies the same rules to any list, for example
        to preview what a policy would delete.
    type: dict
    suboptions:
      match:
        description:
          - Shell-style glob (case-sensitive) of the snapshot names this policy manages, for example V(auto-*).
          - Required, so that a policy never deletes snapshots it was not meant for.
        type: str
      keep:
        description: Number of newest matching snapshots to keep.
        type: int
      keep_daily:
        description:
          - Keep the newest matching snapshot of each of this many days, newest days first, that hold one
            and that O(retention.keep) does not cover already.
        type: int
        version_added: 0.2.0
      keep_weekly:
        description:
          - Keep the newest matching snapshot of each of this many ISO weeks, newest first, that hold one
            and that the rules before it do not cover already.
        type: int
        version_added: 0.2.0
      keep_monthly:
        description:
          - Keep the newest matching snapshot of each of this many calendar months, newest first, that hold one
            and that the rules before it do not cover already.
        type: int
        version_added: 0.2.0
      max_age:
        description:
          - Delete matching snapshots older than this, as a whole number with a unit
            V(s), V(m), V(h), V(d) or V(w), for example V(7d). A bare number means seconds.
        type: str
notes:
  - With O(paths) the images are read, and for O(state=present) the snapshots created, several at a time (one
    C(qemu-img) process per image, up to as many at once as the host has CPUs, at least 2 and at most 8). The
    snapshots of one task are still consistent with each other because the VM is not running. Deletions
    (O(state=absent)), reverts and retention deletes run one image after another, so that a failure stops
    before the next image.
  - An image with more than 10 internal snapshots triggers a warning; each snapshot slows guest writes.
  - Before changing an image the module checks that its filesystem has room for the metadata update,
    because C(qemu-img) leaves a changed image with leaked clusters when it runs out of space midway.
  - Every C(qemu-img) call has a time limit, so that a hung file system (an NFS server that stopped
    answering) cannot block the task, and the image lock it holds, forever. Metadata calls (info, bitmap,
    create) get 300 seconds; snapshot calls (a revert or delete walks the whole image) and calls that read guest
    data (check, convert, commit, rebase, compare, map) get 3600 seconds plus one second per 5 MiB of the images
    they name (the larger of file size and virtual size). A call that runs longer is killed and the task fails
    with a message naming the command, the image and the seconds; it never reports success.
requirements:
  - C(qemu-img) (Debian/Ubuntu package C(qemu-utils)) on the target host.
seealso:
  - module: vmsnap.qemu.qcow2_info
"""

EXAMPLES = r"""
---
- name: Checkpoint both disks of a stopped VM before an upgrade
  vmsnap.qemu.qcow2_snapshot:
    paths:
      - /var/lib/vms/db01-system.qcow2
      - /var/lib/vms/db01-data.qcow2
    name: pre-upgrade

- name: Roll the disks back to the checkpoint
  vmsnap.qemu.qcow2_snapshot:
    paths:
      - /var/lib/vms/db01-system.qcow2
      - /var/lib/vms/db01-data.qcow2
    name: pre-upgrade
    state: reverted

- name: Roll back a disk that vmsnap.qemu.qcow2_backup backs up (its next backup is then a full one)
  vmsnap.qemu.qcow2_snapshot:
    path: /var/lib/vms/web01.qcow2
    name: pre-upgrade
    state: reverted
    backup_bitmaps: drop

- name: Release the checkpoint
  vmsnap.qemu.qcow2_snapshot:
    path: /var/lib/vms/db01-system.qcow2
    name: pre-upgrade
    state: absent

- name: Nightly snapshot, keeping the newest 7 and none older than 14 days
  vmsnap.qemu.qcow2_snapshot:
    path: /var/lib/vms/web01.qcow2
    name: "auto-{{ now(utc=true, fmt='%Y%m%dT%H%M%SZ') }}"
    retention:
      match: "auto-*"
      keep: 7
      max_age: 14d

- name: Nightly snapshot, keeping 7 daily, 4 weekly and 6 monthly ones
  vmsnap.qemu.qcow2_snapshot:
    path: /var/lib/vms/web01.qcow2
    name: "auto-{{ now(utc=true, fmt='%Y%m%dT%H%M%SZ') }}"
    retention:
      match: "auto-*"
      keep_daily: 7
      keep_weekly: 4
      keep_monthly: 6

- name: Prune without creating anything
  vmsnap.qemu.qcow2_snapshot:
    path: /var/lib/vms/web01.qcow2
    state: pruned
    retention:
      match: "auto-*"
      max_age: 30d
"""

RETURN = r"""
snapshot:
  description:
    - The snapshot acted on (created, found, deleted or applied), when O(path) was given.
    - V(null) for O(state=absent) when there was nothing to delete, and for O(state=pruned).
  returned: when O(path) is used
  type: dict
  contains:
    id:
      description:
        - QEMU's snapshot ID.
        - In check mode a snapshot that would be created has no ID yet (V(null)).
      type: str
      sample: "3"
    name:
      description: The snapshot's name (tag).
      type: str
      sample: pre-upgrade
    vm_state_size:
      description: Bytes of saved VM state; V(0) for the disk-only snapshots this module makes.
      type: int
      sample: 0
    date:
      description:
        - Creation time, ISO 8601 in UTC.
        - V(null) in check mode for a snapshot that would be created.
      type: str
      sample: "2026-11-27T14:29:35Z"
    date_epoch:
      description: Creation time in seconds since the epoch (V(null) like RV(snapshot.date)).
      type: float
      sample: 1795789775.83
    vm_clock:
      description: The guest clock stored with the snapshot, in seconds.
      type: float
      sample: 0.0
dropped_bitmaps:
  description:
    - O(state=reverted) with O(backup_bitmaps=drop), when O(path) was given; the backup bitmaps removed before the
      revert (in check mode, that would be removed), each with the backup set it belonged to.
  returned: when O(path) is used
  type: list
  elements: dict
  sample: [{name: vmsnap-backup-web01-3f9a0c12, set: web01}]
snapshots:
  description:
    - All internal snapshots of the image after the task, when O(path) was given, with the keys of RV(snapshot).
    - In check mode, the predicted list.
  returned: when O(path) is used
  type: list
  elements: dict
  sample:
    - {id: "1", name: auto-20261126T020000Z, vm_state_size: 0, date: "2026-11-26T02:00:00Z", date_epoch: 1795658400.0,
       vm_clock: 0.0}
    - {id: "3", name: pre-upgrade, vm_state_size: 0, date: "2026-11-27T14:29:35Z", date_epoch: 1795789775.83,
       vm_clock: 0.0}
pruned:
  description: Names of the snapshots deleted by O(retention) (in check mode, that would be deleted).
  returned: when O(path) is used
  type: list
  elements: str
  sample: [auto-20261101T020000Z]
results:
  description: One entry per image, in the order given.
  returned: always
  type: list
  elements: dict
  contains:
    path:
      description: The image.
      type: str
      sample: /var/lib/vms/db01-system.qcow2
    changed:
      description: Whether this image was (or in check mode would be) changed.
      type: bool
      sample: true
    dropped_bitmaps:
      description: As RV(dropped_bitmaps), for this image.
      type: list
      elements: dict
      sample: []
    snapshot:
      description: As RV(snapshot), for this image.
      type: dict
      sample: {id: "1", name: pre-upgrade, vm_state_size: 0, date: "2026-11-27T14:29:35Z",
               date_epoch: 1795789775.83, vm_clock: 0.0}
    snapshots:
      description: As RV(snapshots), for this image.
      type: list
      elements: dict
      sample: [{id: "1", name: pre-upgrade, vm_state_size: 0, date: "2026-11-27T14:29:35Z",
                date_epoch: 1795789775.83, vm_clock: 0.0}]
    pruned:
      description: As RV(pruned), for this image.
      type: list
      elements: str
      sample: []
"""

import os
import time
import typing as t

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._image import ImageInfo
from ansible_collections.vmsnap.qemu.plugins.module_utils._lock import image_locks
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
from ansible_collections.vmsnap.qemu.plugins.module_utils._retention import RetentionPolicy
from ansible_collections.vmsnap.qemu.plugins.module_utils._revert_bitmaps import drop_warning
from ansible_collections.vmsnap.qemu.plugins.module_utils._snapshot import ImagePlan, execute, plan_image
from ansible_collections.vmsnap.qemu.plugins.module_utils._validate import (
    validate_image_path,
    validate_snapshot_name,
)

ARGUMENT_SPEC: dict[str, t.Any] = dict(
    path=dict(type="path"),
    paths=dict(type="list", elements="path"),
    name=dict(type="str"),
    backup_bitmaps=dict(type="str", default="fail", choices=["fail", "drop"]),
    state=dict(type="str", default="present", choices=["present", "absent", "reverted", "pruned"]),
    retention=dict(
        type="dict",
        options=dict(
            match=dict(type="str"),
            keep=dict(type="int"),
            keep_daily=dict(type="int"),
            keep_weekly=dict(type="int"),
            keep_monthly=dict(type="int"),
            max_age=dict(type="str"),
        ),
    ),
    lock_timeout=dict(type="float", default=60.0),
)


def main() -> t.NoReturn:
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        mutually_exclusive=[("path", "paths")],
        required_one_of=[("path", "paths")],
        required_if=[
            ("state", "present", ("name",)),
            ("state", "absent", ("name",)),
            ("state", "reverted", ("name",)),
            ("state", "pruned", ("retention",)),
        ],
        supports_check_mode=True,
    )
    params = module.params
    paths: list[str] = [params["path"]] if params["path"] is not None else list(params["paths"])
    plans: list[ImagePlan] = []
    after: dict[str, ImageInfo] = {}
    try:
        if not paths:
            raise ValidationError("paths must list at least one image.")
        for path in paths:
            validate_image_path(path)
        if len({os.path.realpath(path) for path in paths}) != len(paths):
            raise ValidationError("paths lists the same image more than once.", paths=paths)
        if params["retention"] is not None and params["state"] not in ("present", "pruned"):
            raise ValidationError(f"retention applies to state=present and state=pruned, not state={params['state']}.")
        if params["backup_bitmaps"] == "drop" and params["state"] != "reverted":
            raise ValidationError(f"backup_bitmaps=drop applies to state=reverted, not state={params['state']}.")
        name = params["name"]
        if params["state"] != "pruned" or name is not None:
            validate_snapshot_name(name)
        policy = RetentionPolicy.from_params(params["retention"])
        qemu_img = QemuImg(module)
        if module.check_mode:
            plans = _plan(qemu_img, paths, params["state"], name, policy, params["backup_bitmaps"])
        else:
            with image_locks(paths, timeout=params["lock_timeout"]):
                plans = _plan(qemu_img, paths, params["state"], name, policy, params["backup_bitmaps"])
                execute(qemu_img, plans)
                after = _read_after(qemu_img, [plan.path for plan in plans if plan.changed])
    except VmsnapError as exc:
        half_done = bool(exc.details.get("changed_paths") or exc.details.get("rollback_failed"))
        exc.do_fail(module, changed=half_done)

    for plan in plans:
        for warning in plan.warnings:
            module.warn(warning)
        if plan.drop_bitmaps:
            module.warn(drop_warning([(plan.where, plan.drop_bitmaps)], str(plan.name), done=not module.check_mode))
    results = [_result(plan, after.get(plan.path)) for plan in plans]
    outcome: dict[str, t.Any] = dict(changed=any(plan.changed for plan in plans), results=results)
    if params["path"] is not None:
        outcome.update({key: value for key, value in results[0].items() if key not in ("changed", "path")})
    if module._diff:
        outcome["diff"] = dict(
            before={plan.path: plan.names_before() for plan in plans},
            after={plan.path: plan.names_after() for plan in plans},
        )
    module.exit_json(**outcome)


def _plan(
    qemu_img: QemuImg,
    paths: list[str],
    state: str,
    name: str | None,
    policy: RetentionPolicy | None,
    backup_bitmaps: str,
) -> list[ImagePlan]:
    now = time.time()
    infos = qemu_img.read_top_many(paths)
    return [plan_image(path, info, state, name, policy, now, backup_bitmaps) for path, info in zip(paths, infos)]


def _read_after(qemu_img: QemuImg, changed_paths: list[str]) -> dict[str, ImageInfo]:
    """The changed images read again; a failed read still reports the change that was made (changed=true)."""
    try:
        return dict(zip(changed_paths, qemu_img.read_top_many(changed_paths)))
    except VmsnapError as exc:
        raise VmsnapError(
            f"The snapshots were changed as requested on {', '.join(changed_paths)}, but reading the images again "
            f"afterwards failed: {exc.msg}",
            changed_paths=changed_paths,
        ) from None


def _result(plan: ImagePlan, after: ImageInfo | None) -> dict[str, t.Any]:
    """Report from the fresh read when the image changed, else from the plan's prediction."""
    if after is not None:
        snapshots = [snap.as_dict() for snap in after.snapshots]
        acted_on = after.snapshots_named(plan.name) if plan.create and plan.name else []
    else:
        snapshots = plan.predicted_snapshots()
        acted_on = []
    snapshot: dict[str, t.Any] | None = None
    if acted_on:
        snapshot = acted_on[0].as_dict()
    elif plan.create:
        snapshot = plan.predicted_new()
    elif plan.delete is not None:
        snapshot = plan.delete.as_dict()
    elif plan.revert is not None:
        snapshot = plan.revert.as_dict()
    elif plan.state == "present" and plan.name is not None:
        snapshot = plan.info.snapshots_named(plan.name)[0].as_dict()
    return dict(
        path=plan.path,
        changed=plan.changed,
        dropped_bitmaps=[bitmap.as_dict() for bitmap in plan.drop_bitmaps],
        snapshot=snapshot,
        snapshots=snapshots,
        pruned=[snap.name for snap in plan.prune],
    )


if __name__ == "__main__":
    main()
