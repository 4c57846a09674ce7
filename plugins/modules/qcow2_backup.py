#!/usr/bin/python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: qcow2_backup
short_description: Full and incremental backups of qcow2 disks (offline or of a running VM), verify, restore, prune
version_added: 0.1.0
description:
  - Backs up qcow2 disks into backup sets, one set per disk, each in its own folder C(<dest_dir>/<set>/) with a JSON
    index (C(index.json), mode 0600) and one qcow2 file per backup.
  - A B(full) backup copies everything the guest sees (a chain of overlays is flattened into it). An
    B(incremental) backup copies only the clusters written since the previous backup of the set, tracked by a
    persistent dirty bitmap on the disk, into a qcow2 file whose backing file is the previous backup. Every backup is
    therefore restorable by itself, as a chain that ends in a full backup.
  - The bitmap is named C(vmsnap-backup-<set>-<chain>); a new one (a new chain) starts with every full backup and
    the previous one is removed once the full backup is recorded. Bitmaps with other names (other tools') are never
    touched, nor are other sets' bitmaps.
  - B(Offline) (O(path), no QEMU runs the image) a full backup is C(qemu-img bitmap --add) of the new chain's bitmap,
    then C(qemu-img convert) into a temporary file in the set, C(qemu-img compare) with the source, fsync and rename.
    An incremental one runs QEMU's own C(blockdev-backup) with C(sync=bitmap) in a helper C(qemu-storage-daemon)
    opened on the image, because C(qemu-img) cannot copy only a bitmap's clusters.
  - B(Live) (O(socket)) every chosen disk is backed up with C(blockdev-backup) in one QMP C(transaction) that also
    adds the new bitmap for full backups. The jobs are finalized together only when all of them have finished, so all
    disks of the VM are backed up at the same instant, or none is.
  - A lost, disabled or inconsistent bitmap (QEMU killed while the disk was open), an interrupted earlier backup, a
    missing newest backup file or a resized disk break the chain. This is detected before anything is written. With
    O(on_broken_chain=full) a full backup is taken instead and the module warns and says why in RV(backup.full_reason);
    with V(fail) it fails. An incremental that could miss changes is never written. A failed or killed backup leaves
    the bitmap as it was (C(bitmap-mode=on-success)), so a retry is safe.
  - Each backup's index entry holds a SHA-256 of the data the backup file itself defines (its allocated clusters,
    zero or data, and their content), computed when it was written; O(state=verified) compares with it.
author:
  - vmsnap.qemu contributors (@vmsnap)
extends_documentation_fragment:
  - vmsnap.qemu._attributes
  - vmsnap.qemu._image_lock
attributes:
  check_mode:
    support: full
    details:
      - Reads the disks, the sets and (offline) the bitmap's count through a read-only helper daemon; writes nothing.
  diff_mode:
    support: full
    details:
      - The diff shows, per set, the ids of its backups before and after the task.
  idempotent:
    support: partial
    details:
      - O(state=present) takes a new backup only when the disk changed since the newest one (with
        O(skip_unchanged=true), the default), so a repeat on an unchanged disk reports no change.
      - With O(skip_unchanged=false) every run of O(state=present) takes a new backup.
      - O(state=restored), O(state=pruned) and O(state=verified) are idempotent.
options:
  path:
    description:
      - Absolute path of an offline qcow2 image (or the top of a chain of overlays).
      - An image that a running QEMU holds is refused; back it up through O(socket) instead.
      - Mutually exclusive with O(socket). For O(state=verified), O(state=restored) and O(state=pruned) O(set_name)
        alone can name the set instead.
    type: path
  socket:
    description:
      - Absolute path of a running VM's QMP socket. Its disks are backed up live, all at the same instant.
    type: path
  devices:
    description:
      - With O(socket), the disks to back up, by drive id, node name or qdev id. Default every writable disk.
    type: list
    elements: str
  dest_dir:
    description:
      - Absolute path of an existing folder; each disk's set is the folder C(<dest_dir>/<set>/), created (0700) when
        missing. O(dest_dir) itself is never created.
    type: path
    required: true
  set_name:
    description:
      - The set's name. Default the file stem of the disk's bottom image (base of its chain), characters other than
        V(A-Z), V(a-z), V(0-9), V(.), V(_) and V(-) replaced by V(_), for example V(web01-disk0) for
        C(/var/lib/vm/web01-disk0.qcow2).
      - Names the set of one disk only; a set whose index records another disk is refused.
    type: str
  state:
    description:
      - V(present) takes a backup (see O(mode)) unless nothing changed since the newest one.
      - V(verified) checks every backup of the set (or the chain that O(backup_id) needs) without restoring it.
        C(qemu-img check), backing file, virtual size and the checksum recorded in the index. Fails listing the
        problems.
      - V(restored) writes backup O(backup_id) (default the newest) to O(restore_to).
      - V(pruned) applies O(retention) to the set.
    type: str
    choices: [present, verified, restored, pruned]
    default: present
  mode:
    description:
      - V(auto) takes a full backup into an empty set (or after a broken chain) and an incremental one after that.
      - V(full) always starts a new chain with a full backup (unless nothing changed and O(skip_unchanged=true)).
      - V(incremental) fails on an empty set (there is no full backup to build on).
    type: str
    choices: [auto, full, incremental]
    default: auto
  compress:
    description: Write the new backup's clusters compressed (qcow2 compression).
    type: bool
    default: false
  verify:
    description:
      - Offline, compare the new backup with the source (C(qemu-img compare)) before it is recorded.
      - For O(state=restored), check the chain's checksums before the restore and compare the restored image with
        the backup after it.
      - The checksum of every new backup is recorded either way.
    type: bool
    default: true
  skip_unchanged:
    description:
      - With O(state=present), take nothing when the chain is healthy and its bitmap counts no changed byte since the
        newest backup. RV(backup) is then the newest existing backup.
    type: bool
    default: true
  on_broken_chain:
    description:
      - What O(state=present) does when an incremental is due but the chain is broken (see the description).
      - V(full) takes a full backup, with a warning. V(fail) fails and writes nothing.
    type: str
    choices: [full, fail]
    default: full
  backup_id:
    description:
      - The backup for O(state=restored) (default the newest) or O(state=verified) (default every backup), as its
        id, for example V(20261201T020000Z).
    type: str
  restore_to:
    description:
      - Absolute path of the image O(state=restored) writes. Its folder must exist.
      - An existing file is refused unless O(force=true), except when it already holds this restore (same guest data,
        and the same form), which is no change.
    type: path
  restore_as:
    description:
      - V(standalone) writes a self-contained qcow2 copy.
      - V(chain) writes only a small qcow2 overlay whose backing file is the backup file (in the set). It is instant,
        but the set's files must then stay as they are while the overlay is in use; do not prune the set meanwhile.
    type: str
    choices: [standalone, chain]
    default: standalone
  force:
    description: Let O(state=restored) replace an existing O(restore_to) (never one that a running QEMU holds).
    type: bool
    default: false
  retention:
    description:
      - Prunes the set after O(state=present), or alone with O(state=pruned).
      - Period rules are applied as Proxmox Backup Server does. V(keep) keeps the newest N backups, then
        V(keep_daily), V(keep_weekly) (ISO weeks) and V(keep_monthly) each keep the newest backup of that many
        periods (UTC) not already covered by a backup an earlier rule kept. V(max_age) then removes older backups.
      - The newest backup is never removed. A removed backup that a kept incremental depends on is merged into it
        (a copy of the kept file is rebased onto its nearest kept ancestor, or made standalone, compared with the
        original chain, checksummed and renamed into place); only then are the removed files deleted. A kept backup
        that lost every ancestor becomes a full one (its file keeps its name).
      - Every backup a merge reads is verified against its checksum first, and no file that a remaining backup
        really uses as its backing file (its own header, whatever the index says) is ever deleted; either problem
        fails the task before anything is removed.
      - A set folder that holds backup files but no C(index.json) is refused by every state that writes.
      - With the disk given (O(path) or O(socket)), the set's stale bitmaps on the disk are removed too.
    type: dict
    suboptions:
      keep:
        description: Number of newest backups to keep (as C(qcow2_snapshot)'s C(retention.keep)).
        type: int
      keep_daily:
        description: Number of days whose newest backup is kept.
        type: int
      keep_weekly:
        description: Number of ISO weeks whose newest backup is kept.
        type: int
      keep_monthly:
        description: Number of months whose newest backup is kept.
        type: int
      max_age:
        description:
          - Remove backups older than this, as a whole number with a unit V(s), V(m), V(h), V(d) or V(w), for
            example V(90d). A bare number means seconds.
        type: str
  timeout:
    description: Seconds a backup job may run before it is cancelled (which leaves the bitmap as it was).
    type: float
    default: 3600
  connect_timeout:
    description: Seconds to wait for the QMP socket (or the helper daemon) to answer.
    type: float
    default: 5
notes:
  - Space is checked before anything is written. A full backup needs about what C(qemu-img measure) reports, an
    incremental about the bitmap's count of changed bytes, plus a margin; with O(compress=true) twice that, because
    the checksum reads compressed clusters through a temporary sparse raw file in the set.
  - Internal snapshots cannot be reverted while a dirty bitmap exists (QEMU refuses it). The modules that revert
    internal snapshots detect this and name the backup set.
  - Temporary files in a set start with C(.tmp-); any run on the set removes those left by a killed run (the set is
    locked for the whole task), and backup files that a killed run renamed but did not record.
  - The index's C(pending) record marks an incremental whose job cleared the bitmap but which is not recorded yet; a
    run that finds it takes a full backup (the bitmap's state is unknown).
requirements:
  - C(qemu-img) (Debian/Ubuntu package C(qemu-utils)) on the target host.
  - C(qemu-storage-daemon) (Debian/Ubuntu package C(qemu-system-common)) for offline incremental backups and for
    O(skip_unchanged) on offline images.
seealso:
  - module: vmsnap.qemu.qcow2_snapshot
  - module: vmsnap.qemu.qmp_live_snapshot
"""

EXAMPLES = r"""
---
- name: Nightly backup of an offline disk (full into an empty set, incremental after that)
  vmsnap.qemu.qcow2_backup:
    path: /var/lib/vms/web01-disk0.qcow2
    dest_dir: /srv/backups
  register: nightly

- name: Weekly full backup, compressed, starting a new chain
  vmsnap.qemu.qcow2_backup:
    path: /var/lib/vms/web01-disk0.qcow2
    dest_dir: /srv/backups
    mode: full
    compress: true

- name: Back up every disk of a running VM at the same instant
  vmsnap.qemu.qcow2_backup:
    socket: /run/qemu/db01.qmp
    dest_dir: /srv/backups
  register: db01

- name: Only the data disk of the running VM, failing rather than taking a surprise full backup
  vmsnap.qemu.qcow2_backup:
    socket: /run/qemu/db01.qmp
    devices: [drive1]
    dest_dir: /srv/backups
    on_broken_chain: fail

- name: Check every backup of a set against its recorded checksums
  vmsnap.qemu.qcow2_backup:
    dest_dir: /srv/backups
    set_name: web01-disk0
    state: verified

- name: Restore the disk as it was at a given backup (point in time), beside the original
  vmsnap.qemu.qcow2_backup:
    dest_dir: /srv/backups
    set_name: web01-disk0
    state: restored
    backup_id: 20261201T020000Z
    restore_to: /var/lib/vms/web01-disk0.restored.qcow2

- name: Keep 7 daily, 4 weekly and 6 monthly backups, none older than a year
  vmsnap.qemu.qcow2_backup:
    path: /var/lib/vms/web01-disk0.qcow2
    dest_dir: /srv/backups
    state: pruned
    retention:
      keep_daily: 7
      keep_weekly: 4
      keep_monthly: 6
      max_age: 365d

- name: Back up and prune in one task
  vmsnap.qemu.qcow2_backup:
    path: /var/lib/vms/web01-disk0.qcow2
    dest_dir: /srv/backups
    retention:
      keep: 14
"""

RETURN = r"""
backup:
  description:
    - When one disk is handled, its backup. For O(state=present) the new backup (or, when nothing changed, the newest
      existing one); for O(state=restored) the backup restored; for O(state=pruned) the newest backup kept.
    - In check mode, the backup that would be taken, with V(null) for what only the backup can tell.
  returned: when one disk is handled and its set has a backup
  type: dict
  contains:
    id:
      description: The backup's id, its UTC time (with V(-2), V(-3)... when several were taken in one second).
      type: str
      sample: 20261201T020000Z
    file:
      description: The backup file.
      type: str
      sample: /srv/backups/web01-disk0/20261201T020000Z.inc.qcow2
    mode:
      description: V(full) or V(incremental).
      type: str
      sample: incremental
    parent:
      description: The id of the backup this one builds on (its backing file), V(null) for a full backup.
      type: str
      sample: 20261130T020000Z
    size:
      description: Size of the backup file in bytes.
      type: int
      sample: 2424832
    changed_bytes:
      description: Guest bytes the backup file itself holds (for an incremental, the changed clusters).
      type: int
      sample: 2097152
    seconds:
      description: Time the backup took, checks included.
      type: float
      sample: 0.84
    time:
      description: When the backup was taken (ISO 8601, UTC).
      type: str
      sample: "2026-12-01T02:00:00Z"
    full_reason:
      description: Why a full backup was taken (V(null) for incrementals), for example a broken chain.
      type: str
      sample: "the bitmap vmsnap-backup-web01-disk0-3f2a9c1e is inconsistent (its QEMU was killed or crashed while
        the disk was open)"
    compressed:
      description: Whether its clusters were written compressed.
      type: bool
      sample: false
    sha256:
      description: Checksum of what the backup file itself defines, recorded when it was written.
      type: str
      sample: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    verified_at:
      description: When the new backup was compared with its source (offline), else V(null).
      type: str
      sample: "2026-12-01T02:00:01Z"
sets:
  description: One entry per disk handled.
  returned: always
  type: list
  elements: dict
  contains:
    set:
      description: The set's name.
      type: str
      sample: web01-disk0
    dest:
      description: The set's folder.
      type: str
      sample: /srv/backups/web01-disk0
    index:
      description: The set's index file.
      type: str
      sample: /srv/backups/web01-disk0/index.json
    source:
      description: The disk's bottom image (real path), which the index records.
      type: str
      sample: /var/lib/vms/web01-disk0.qcow2
    backup:
      description: As RV(backup), for this set.
      type: dict
      sample: {id: 20261201T020000Z, mode: full, parent: null}
    bitmap:
      description: The bitmap of the set's current chain on the disk.
      type: str
      sample: vmsnap-backup-web01-disk0-3f2a9c1e
    full_reason:
      description: Why this run took a full backup, V(null) otherwise.
      type: str
      sample: the set has no backup yet
    pruned:
      description: Ids of the backups removed by O(retention) (in check mode, that would be removed).
      type: list
      elements: str
      sample: [20261101T020000Z]
    kept:
      description: Ids of the backups the set keeps.
      type: list
      elements: str
      sample: [20261130T020000Z, 20261201T020000Z]
    cleaned:
      description: Leftovers of killed runs removed from the set folder.
      type: list
      elements: str
      sample: [.tmp-20261201T020000Z.qcow2]
    removed_bitmaps:
      description: Stale bitmaps of this set removed from the disk.
      type: list
      elements: str
      sample: []
    verified:
      description: For O(state=verified), one entry per backup checked (id, file, ok, problems).
      returned: with O(state=verified)
      type: list
      elements: dict
      sample: [{id: 20261201T020000Z, file: /srv/backups/web01-disk0/20261201T020000Z.full.qcow2, ok: true,
                problems: []}]
verified:
  description: For O(state=verified), every backup checked across the sets (id, file, ok, problems).
  returned: with O(state=verified)
  type: list
  elements: dict
  sample: [{id: 20261201T020000Z, file: /srv/backups/web01-disk0/20261201T020000Z.full.qcow2, ok: true, problems: []}]
restored:
  description: For O(state=restored), what was restored where.
  returned: with O(state=restored)
  type: dict
  sample: {id: 20261201T020000Z, file: /srv/backups/web01-disk0/20261201T020000Z.inc.qcow2,
           path: /var/lib/vms/web01-disk0.restored.qcow2, restore_as: standalone,
           chain: [/srv/backups/web01-disk0/20261130T020000Z.full.qcow2,
                   /srv/backups/web01-disk0/20261201T020000Z.inc.qcow2]}
"""

import typing as t

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmsnap.qemu.plugins.module_utils._backup_execute import run_task
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg

ARGUMENT_SPEC: dict[str, t.Any] = dict(
    path=dict(type="path"),
    socket=dict(type="path"),
    devices=dict(type="list", elements="str"),
    dest_dir=dict(type="path", required=True),
    set_name=dict(type="str"),
    state=dict(type="str", default="present", choices=["present", "verified", "restored", "pruned"]),
    mode=dict(type="str", default="auto", choices=["auto", "full", "incremental"]),
    compress=dict(type="bool", default=False),
    verify=dict(type="bool", default=True),
    skip_unchanged=dict(type="bool", default=True),
    on_broken_chain=dict(type="str", default="full", choices=["full", "fail"]),
    backup_id=dict(type="str"),
    restore_to=dict(type="path"),
    restore_as=dict(type="str", default="standalone", choices=["standalone", "chain"]),
    force=dict(type="bool", default=False),
    retention=dict(
        type="dict",
        options=dict(
            keep=dict(type="int"),
            keep_daily=dict(type="int"),
            keep_weekly=dict(type="int"),
            keep_monthly=dict(type="int"),
            max_age=dict(type="str"),
        ),
    ),
    timeout=dict(type="float", default=3600.0),
    connect_timeout=dict(type="float", default=5.0),
    lock_timeout=dict(type="float", default=60.0),
)


def main() -> t.NoReturn:
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        mutually_exclusive=[("path", "socket")],
        required_if=[("state", "restored", ("restore_to",)), ("state", "pruned", ("retention",))],
        supports_check_mode=True,
    )
    try:
        qemu_img = QemuImg(module)
        daemon = module.get_bin_path("qemu-storage-daemon", required=False)
        result = run_task(qemu_img, module.params, module.check_mode, module.warn, daemon=daemon)
    except VmsnapError as exc:
        exc.do_fail(module, changed=bool(exc.details.get("changed", False)))
    diff = result.pop("diff")
    if module._diff:
        result["diff"] = diff
    module.exit_json(**result)


if __name__ == "__main__":
    main()
