# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""QEMU jobs left behind by a qmp_live_snapshot task that was killed (SIGKILL, OOM, a lost controller).

QEMU runs snapshot-save/-load/-delete and block-commit on its own; the task only waits for them. A killed task leaves
its job running, concluded and never dismissed, or (an active block-commit) waiting in 'ready' for a job-complete
that never comes. Each job id is vmsnap-<action>-<pid>-<n> (_live_execute._job_id): when that pid no longer exists,
the next task finishes the job for it - waits, completes a ready commit (the merge the killed task had asked for),
dismisses - instead of refusing the VM forever. Backup jobs (vmsnap-backup-*) are qcow2_backup's to clean up.
"""

from __future__ import annotations

import os
import re
import stat
import typing as t

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient

_LIVE_JOB = re.compile(r"^vmsnap-(save|load|delete|commit)-([0-9]+)-[0-9]+$")
_WAITABLE = ("created", "running", "waiting", "pending", "aborting")


def orphaned_owner(job_id: t.Any) -> int | None:
    """The pid of the qmp_live_snapshot task that started job_id, when that process is gone; else None."""
    match = _LIVE_JOB.match(str(job_id))
    if match is None:
        return None
    pid = int(match.group(2))
    if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
        return None
    return pid


def finish_orphaned_jobs(qmp: QmpClient, timeout: float) -> list[str]:
    """Finish every job of a killed qmp_live_snapshot task; returns a warning per job (what was found and done).

    A job that is paused (by someone's job-pause or an I/O error) is left alone: the plan then refuses the VM with
    the job's id, as for any other running vmsnap job.
    """
    notes = []
    for job in qmp.execute("query-jobs") or []:
        if not isinstance(job, dict) or orphaned_owner(job.get("id")) is None:
            continue
        job_id, kind, found = str(job["id"]), job.get("type"), str(job.get("status"))
        status = found
        if status in _WAITABLE:
            status = qmp.wait_job(job_id, ("ready", "concluded"), timeout)
        if status == "ready" and kind == "commit":
            qmp.execute("job-complete", {"id": job_id})
            status = qmp.wait_job(job_id, ("concluded",), timeout)
        if status != "concluded":
            continue
        error = (qmp.query_job(job_id) or {}).get("error")
        qmp.execute("job-dismiss", {"id": job_id})
        outcome = f"it had failed: {error}" if error else "it had succeeded"
        notes.append(
            f"Found the {kind} job {job_id} of an earlier task that no longer runs (status {found}); "
            f"{'completed and ' if found == 'ready' else ''}dismissed it: {outcome}."
        )
    return notes


def is_unused_claim(path: str) -> bool:
    """An empty regular file (not a link) at an overlay's name: claimed by a task killed before QEMU wrote it."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def remove_leftover_overlay(qemu_img: QemuImg, overlay: str, disk_file: str, merged: bool) -> str | None:
    """Remove an overlay file of this snapshot that is no longer in the disk's chain nor open in QEMU.

    An empty file was claimed and never used. With merged (state=absent), a qcow2 overlay on disk_file whose every
    byte the disk now reads the same (qemu-img compare) was merged by a killed task that did not get to delete it.
    Anything else stays. Returns a warning saying what was found and done, or None when the file is not there.
    """
    if not os.path.lexists(overlay):
        return None
    if is_unused_claim(overlay):
        os.unlink(overlay)
        return f"Removed the empty overlay file {overlay} that an earlier task had claimed and never used."
    if not merged or os.path.islink(overlay) or not os.path.isfile(overlay):
        return None
    try:
        info = qemu_img.run_json(["info", "--output=json", "-U", "--", overlay])
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        same = (
            info.get("format") == "qcow2"
            and isinstance(backing, str)
            and os.path.realpath(backing) == os.path.realpath(disk_file)
        )
        if same:
            qemu_img.run(["compare", "-U", "-q", "-f", "qcow2", "-F", "qcow2", "--", overlay, disk_file])
    except VmsnapError:
        same = False
    if not same:
        return (
            f"The overlay file {overlay} is no longer part of the disk's chain, but the disk {disk_file} does not "
            "read the same data, so it may hold data that was never merged; it was left in place. Check it with "
            "qemu-img compare and delete it by hand."
        )
    os.unlink(overlay)
    return (
        f"Removed the overlay file {overlay}: an earlier task merged it into {disk_file} (the disk reads the same "
        "data) and was stopped before it deleted the file."
    )
