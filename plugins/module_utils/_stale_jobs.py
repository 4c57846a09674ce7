# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""What a killed task (SIGKILL, OOM, a lost controller) leaves in a running VM, and how the next run finishes it.

Jobs:
QEMU runs snapshot-save/-load/-delete and block-commit on its own; the task only waits for them. A killed task leaves
its job running, concluded and never dismissed, or (an active block-commit) waiting in 'ready' for a job-complete
that never comes. Each job id is vmsnap-<action>-<pid>-<n> (_live_execute._job_id): when that pid no longer exists,
the next task finishes the job for it - waits, completes a ready commit (the merge the killed task had asked for),
dismisses - instead of refusing the VM forever. Backup jobs (vmsnap-backup-*) are qcow2_backup's to clean up.

Pauses: a task that stops a running guest (a state save, a revert that drops bitmaps) first adds a marker object to
that QEMU, /objects/vmsnap-paused-<pid> (a QOM secret: it holds nothing, is not migrated and ends with the QEMU
process), and the module removes it when it ends. A marker whose process is gone means that task was killed with
the guest possibly still stopped by it: the next run resumes the guest (only from paused/postmigrate, and not while
a migration still runs) and removes the marker. A guest paused by anyone else has no marker and stays paused.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
import typing as t

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient, QmpError

_LIVE_JOB = re.compile(r"^vmsnap-(save|load|delete|commit)-([0-9]+)-[0-9]+$")
_PAUSE_MARK = "vmsnap-paused-"
_PAUSE_MARKER = re.compile(r"^vmsnap-paused-([0-9]+)$")
_RESUMABLE = ("paused", "postmigrate")
_MIGRATING = ("setup", "active", "pre-switchover", "device", "postcopy-active", "postcopy-paused", "postcopy-recover")


def process_gone(pid: int) -> bool:
    """Whether pid no longer runs; a killed process that nobody reaped yet (a zombie) is gone too."""
    if pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


_WAITABLE = ("created", "running", "waiting", "pending", "aborting")


def orphaned_owner(job_id: t.Any) -> int | None:
    """The pid of the qmp_live_snapshot task that started job_id, when that process is gone; else None."""
    match = _LIVE_JOB.match(str(job_id))
    if match is None:
        return None
    pid = int(match.group(2))
    return pid if process_gone(pid) else None


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


def mark_paused(qmp: QmpClient) -> None:
    """Right before this task stops the guest: leave a marker in QEMU that names this process (see above)."""
    # Already there (a second pause of this task), or a QEMU without secrets: the pause goes on unmarked.
    with contextlib.suppress(QmpError):
        qmp.execute("object-add", {"qom-type": "secret", "id": f"{_PAUSE_MARK}{os.getpid()}", "data": "vmsnap"})


def unmark_paused(qmp: QmpClient) -> None:
    """When the task ends, whatever happened: its marker goes (QEMU may be gone already)."""
    with contextlib.suppress(VmsnapError, OSError):
        qmp.execute("object-del", {"id": f"{_PAUSE_MARK}{os.getpid()}"})


def resume_left_paused(qmp: QmpClient, check_mode: bool, timeout: float = 0.0) -> list[str]:
    """Resume a guest that a killed task had stopped (its marker is there, its process gone); returns warnings.

    A state save that task started may still be writing: the guest is resumed once it has ended, waiting up to
    timeout (not in check mode)."""
    notes = []
    for entry in qmp.execute("qom-list", {"path": "/objects"}) or []:
        match = _PAUSE_MARKER.match(str(entry.get("name") if isinstance(entry, dict) else ""))
        if match is None or not process_gone(int(match.group(1))):
            continue
        marker = match.group(0)
        migration = _migration_status(qmp)
        if migration in _MIGRATING and not check_mode:
            migration = _wait_for_migration_end(qmp, timeout)
        status = str((qmp.execute("query-status") or {}).get("status"))
        if migration in _MIGRATING:
            notes.append(
                f"An earlier task (pid {match.group(1)}) that no longer runs had paused the guest; a migration or "
                f"state save it started is still {migration}, so the guest was not resumed yet."
            )
            continue
        if check_mode:
            if status in _RESUMABLE:
                notes.append(
                    f"An earlier task (pid {match.group(1)}) that no longer runs left the guest paused (status "
                    f"{status}); the real run resumes it first."
                )
            continue
        if status in _RESUMABLE:
            qmp.execute("cont")
            notes.append(
                f"An earlier task (pid {match.group(1)}) that no longer runs had paused the guest and left it so "
                f"(status {status}); it was resumed."
            )
        qmp.execute("object-del", {"id": marker})
    return notes


def _migration_status(qmp: QmpClient) -> t.Any:
    reply = qmp.execute("query-migrate")
    return reply.get("status") if isinstance(reply, dict) else None


def _wait_for_migration_end(qmp: QmpClient, timeout: float) -> t.Any:
    """The migration's status once it is no longer running, or its status when timeout runs out."""
    deadline = time.monotonic() + timeout
    while True:
        status = _migration_status(qmp)
        if status not in _MIGRATING or time.monotonic() >= deadline:
            return status
        time.sleep(0.2)


@contextlib.contextmanager
def pause_marker_cleared(qmp: QmpClient) -> t.Iterator[None]:
    """Around a module's work on a VM: this task's pause marker is gone when it ends, however it ends."""
    try:
        yield
    finally:
        unmark_paused(qmp)
