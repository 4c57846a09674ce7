# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Backups through QEMU's own block layer: blockdev-backup jobs started in one transaction, and a helper
qemu-storage-daemon that gives an image no VM runs the same engine.

run_backup_jobs() never reports success for a job that did not conclude without error, and on any failure it
cancels every job it started, so a bitmap used by an incremental is left as it was (bitmap-mode on-success) and a
bitmap added for a full backup is removed again.

QEMU accepts `completion-mode: grouped` only for transactions made of backup actions alone (7.2 refuses it next to
block-dirty-bitmap-add). So the jobs always run with auto-finalize off and the engine itself finalizes all of them
only once every one has reached `pending`: grouped when QEMU allows it (incrementals of several disks), the same
all-or-nothing by hand when the transaction also adds bitmaps (full backups).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import typing as t
from dataclasses import dataclass

from ansible_collections.vmsnap.qemu.plugins.module_utils._bitmap_names import BITMAP_PREFIX, parse_bitmap_name
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ImageInUseError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import C_LOCALE, is_lock_error
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient, QmpError

if t.TYPE_CHECKING:
    from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg

JOB_PREFIX = "vmsnap-backup-"
TARGET_NODE_PREFIX = "vmsnap-t-"
DAEMON_NODE = "vmsnap-src"
SYNC_MODES = ("full", "bitmap")

_POLL_SECONDS = 0.5
_CANCEL_GRACE_SECONDS = 30.0
_FINALIZE_GRACE_SECONDS = 60.0
_DAEMON_CLOSE_SECONDS = 15.0
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes
_PR_SET_PDEATHSIG = 1
_ENDED = ("concluded", "null")
_CANCELLED = "Operation canceled"


class BackupError(VmsnapError):
    """A backup job could not be started, failed, timed out or was cancelled; what it created was removed."""


@dataclass
class DiskJob:
    node: str  # source node name (the active node of the disk, or the daemon's node)
    target: str  # absolute path of the new backup file (a `.tmp-` name; created by the engine)
    virtual_size: int
    sync: str  # "full" or "bitmap"
    bitmap: str | None  # for sync=bitmap: the chain's bitmap; for full: the NEW bitmap to add in the transaction
    backing: str | None = None  # incremental: the previous backup file (target is created with -b backing -F qcow2)
    compress: bool = False
    job_id: str = ""  # filled with "vmsnap-backup-<set>" if empty (set = from the bitmap name)
    speed: int = 0  # bytes per second, 0 = as fast as possible


@dataclass
class JobResult:
    job: DiskJob
    seconds: float
    bytes_copied: int  # from the job's total-progress


@dataclass
class BitmapState:
    name: str
    recording: bool
    inconsistent: bool
    persistent: bool
    busy: bool
    count: int  # dirty bytes
    granularity: int = 0


# ---- pure parts -------------------------------------------------------------------------------------------------


def job_id_for(job: DiskJob) -> str:
    """vmsnap-backup-<set> from the bitmap's name; a job without one of our bitmaps is named after its node."""
    parsed = parse_bitmap_name(job.bitmap)
    if parsed is not None:
        return JOB_PREFIX + parsed[0]
    return JOB_PREFIX + re.sub(r"[^A-Za-z0-9._-]", "_", job.node)


def assign_job_ids(jobs: t.Sequence[DiskJob]) -> None:
    """Fill empty job ids; two jobs never share one (a later one gets -2, -3, ...)."""
    taken: set[str] = {job.job_id for job in jobs if job.job_id}
    if len(taken) != len([job for job in jobs if job.job_id]):
        raise BackupError("Two backup jobs were given the same job id.")
    for job in jobs:
        if job.job_id:
            continue
        base = job_id_for(job)
        candidate, number = base, 1
        while candidate in taken:
            number += 1
            candidate = f"{base}-{number}"
        job.job_id = candidate
        taken.add(candidate)


def target_node_name(job_id: str) -> str:
    """The target's node name, fixed per job id so a later run finds a killed task's node; QEMU allows 31 chars."""
    return TARGET_NODE_PREFIX + hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:20]


def backing_reference(target: str, backing: str) -> str:
    """How the new file names its backing file: relative when both are in one folder, so a set can be moved."""
    if os.path.dirname(os.path.abspath(backing)) == os.path.dirname(os.path.abspath(target)):
        return os.path.basename(backing)
    return os.path.abspath(backing)


def check_jobs(jobs: t.Sequence[DiskJob]) -> None:
    """Refuse jobs the engine cannot run soundly, before anything is created."""
    if not jobs:
        raise BackupError("No disk to back up.")
    targets = [os.path.abspath(job.target) for job in jobs]
    if len(set(targets)) != len(targets):
        raise BackupError("Two backup jobs write the same target file.")
    if len({job.node for job in jobs}) != len(jobs):
        raise BackupError("Two backup jobs read the same node.")
    for job in jobs:
        if job.sync not in SYNC_MODES:
            raise BackupError(f"Unknown backup sync mode {job.sync!r} for node {job.node}.")
        if not os.path.isabs(job.target):
            raise BackupError(f"The backup target {job.target} is not an absolute path.")
        if job.virtual_size <= 0:
            raise BackupError(f"The virtual size of node {job.node} is unknown.")
        if job.sync == "bitmap" and (not job.bitmap or not job.backing):
            raise BackupError(f"An incremental backup of node {job.node} needs a bitmap and the previous backup.")
        if job.bitmap is not None and parse_bitmap_name(job.bitmap) is None:
            raise BackupError(f"{job.bitmap!r} is not a bitmap name of vmsnap.qemu ({BITMAP_PREFIX}<set>-<chain>).")


def transaction_actions(jobs: t.Sequence[DiskJob]) -> tuple[list[dict[str, t.Any]], dict[str, t.Any]]:
    """The transaction's actions and properties: a persistent bitmap added per full backup at the instant its copy
    starts, one blockdev-backup per disk (finalized and dismissed by the engine)."""
    actions: list[dict[str, t.Any]] = []
    for job in jobs:
        if job.sync == "full" and job.bitmap:
            actions.append(
                {"type": "block-dirty-bitmap-add", "data": {"node": job.node, "name": job.bitmap, "persistent": True}}
            )
    for job in jobs:
        data: dict[str, t.Any] = {
            "job-id": job.job_id,
            "device": job.node,
            "target": target_node_name(job.job_id),
            "sync": job.sync,
            "auto-finalize": False,
            "auto-dismiss": False,
        }
        if job.sync == "bitmap":
            data["bitmap"] = job.bitmap
            data["bitmap-mode"] = "on-success"
        if job.compress:
            data["compress"] = True
        if job.speed > 0:
            data["speed"] = int(job.speed)
        actions.append({"type": "blockdev-backup", "data": data})
    only_backups = all(action["type"] == "blockdev-backup" for action in actions)
    grouped = len(jobs) > 1 and only_backups
    return actions, ({"completion-mode": "grouped"} if grouped else {})


def target_blockdev(job: DiskJob) -> dict[str, t.Any]:
    """blockdev-add arguments for a target. Its backing file stays closed: the job writes whole clusters, so nothing
    is read from it, and QEMU need not open the older backups at all."""
    return {
        "driver": "qcow2",
        "node-name": target_node_name(job.job_id),
        "file": {"driver": "file", "filename": job.target},
        "backing": None,
    }


def parse_bitmaps(nodes: t.Sequence[dict[str, t.Any]], node: str) -> dict[str, BitmapState]:
    """The dirty bitmaps of one node from query-named-block-nodes; raises when the node is not there."""
    for entry in nodes:
        if entry.get("node-name") == node:
            return {
                str(bitmap["name"]): BitmapState(
                    name=str(bitmap["name"]),
                    recording=bool(bitmap.get("recording", False)),
                    inconsistent=bool(bitmap.get("inconsistent", False)),
                    persistent=bool(bitmap.get("persistent", False)),
                    busy=bool(bitmap.get("busy", False)),
                    count=int(bitmap.get("count", 0)),
                    granularity=int(bitmap.get("granularity", 0)),
                )
                for bitmap in entry.get("dirty-bitmaps") or []
                if "name" in bitmap  # anonymous bitmaps (of a running job) have no name
            }
    raise BackupError(f"QEMU has no block node named {node}.", node=node)


def job_failure(job: DiskJob, entry: dict[str, t.Any] | None) -> str | None:
    """Why a job did not succeed, from its query-jobs entry; None while it is running or pending."""
    if entry is None:
        return "the job disappeared (someone else dismissed it?)"
    status = entry.get("status")
    if status == "pending":
        return None
    if entry.get("error"):
        return str(entry["error"])
    if status in _ENDED or status == "aborting":
        return f"the job ended without reaching pending (status {status})"
    return None


def first_cause(failures: dict[str, str]) -> tuple[str, str]:
    """The failure to report: a job's own error rather than a sibling QEMU cancelled because of it."""
    for job_id, reason in failures.items():
        if reason != _CANCELLED:
            return job_id, reason
    job_id = next(iter(failures))
    return job_id, failures[job_id]


# ---- QEMU ---------------------------------------------------------------------------------------------------------


def bitmaps_of(qmp: QmpClient, node: str) -> dict[str, BitmapState]:
    return parse_bitmaps(qmp.execute("query-named-block-nodes", {"flat": True}) or [], node)


def remove_bitmap(qmp: QmpClient, node: str, name: str) -> None:
    """Remove one of the collection's bitmaps from a node; a bitmap that is not there is already removed."""
    if parse_bitmap_name(name) is None:
        raise BackupError(f"Refusing to remove the bitmap {name!r}: it is not one of vmsnap.qemu's.", node=node)
    if name not in bitmaps_of(qmp, node):
        return
    try:
        qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
    except QmpError as exc:
        raise BackupError(f"Cannot remove the bitmap {name} from {node}: {exc.desc}", node=node, bitmap=name) from None


def leftover_job_ids(qmp: QmpClient) -> list[str]:
    """Every vmsnap-backup- job in this QEMU. A live run holds the VM's QMP socket, which serves one client at a time,
    from before its jobs start until they are finalized or cancelled: a run that finds one finds a killed run's."""
    return [
        str(job["id"])
        for job in qmp.execute("query-jobs", expect=list)
        if isinstance(job, dict) and str(job.get("id", "")).startswith(JOB_PREFIX)
    ]


def cancel_stale_jobs(qmp: QmpClient, job_ids: t.Iterable[str]) -> list[str]:
    """Cancel+dismiss our own leftover jobs (pending after a killed task); returns their ids.

    Also closes the target node a killed task left open. Cancelling a backup job leaves its bitmap as it was.
    Only ids with the vmsnap-backup- prefix are accepted: other jobs are never touched.
    """
    wanted = list(job_ids)
    for job_id in wanted:
        if not job_id.startswith(JOB_PREFIX):
            raise BackupError(f"Refusing to cancel the job {job_id!r}: it is not one of vmsnap.qemu's.")
    stale = [job for job in qmp.execute("query-jobs") or [] if job.get("id") in wanted]
    ids = [str(job["id"]) for job in stale]
    for job in stale:
        if job.get("status") not in _ENDED:
            _ignore_qmp_error(qmp, "job-cancel", {"id": job["id"]})
    still_running = _wait_ended(qmp, ids, _CANCEL_GRACE_SECONDS)
    if still_running:
        raise BackupError(
            f"The leftover backup jobs {', '.join(still_running)} did not stop within {_CANCEL_GRACE_SECONDS:g} s of "
            "being cancelled; nothing else was done. Check them with query-jobs.",
            jobs=still_running,
        )
    for job_id in ids:
        _ignore_qmp_error(qmp, "job-dismiss", {"id": job_id})
    present = {entry.get("node-name") for entry in qmp.execute("query-named-block-nodes", {"flat": True}) or []}
    for job_id in wanted:
        node = target_node_name(job_id)
        if node in present:
            try:
                qmp.execute("blockdev-del", {"node-name": node})
            except QmpError as exc:
                raise BackupError(
                    f"Cannot close the target node {node} that an earlier backup ({job_id}) left open: {exc.desc}",
                    node=node,
                ) from None
    return ids


def run_backup_jobs(
    qmp: QmpClient,
    qemu_img: QemuImg,
    jobs: list[DiskJob],
    timeout: float,
    before_finalize: t.Callable[[], None],
) -> list[JobResult]:
    """Create each target file, blockdev-add it, one transaction (bitmap-add for full + blockdev-backup per disk;
    completion-mode grouped when QEMU allows it), wait for all jobs to reach `pending`, call before_finalize() (the
    caller writes the index's pending record), job-finalize, wait `concluded`, dismiss, blockdev-del the targets.
    On error or timeout: job-cancel every job, wait, dismiss, blockdev-del, remove the target files it created and
    any bitmap it added, then raise BackupError naming the disk and QEMU's error (an exception of before_finalize
    itself is raised as it is, after the same clean-up)."""
    check_jobs(jobs)
    assign_job_ids(jobs)
    run = _BackupRun(qmp, jobs)
    in_caller = False
    try:
        run.preflight()
        run.create_targets(qemu_img)
        run.open_targets()
        run.start()
        results = run.wait_pending(timeout)
        in_caller = True
        before_finalize()
        in_caller = False
        run.finalize()
        run.close_targets()
    except BaseException as exc:
        problems = run.abort(qemu_died=isinstance(exc, VmsnapError) and bool(exc.details.get("vm_died")))
        error = exc
        if isinstance(exc, VmsnapError) and not isinstance(exc, BackupError) and not in_caller:
            disks = ", ".join(job.node for job in jobs)
            error = BackupError(f"The backup of {disks} failed: {exc.msg}", **exc.details)
        if problems and isinstance(error, VmsnapError):
            error.msg += " Clean-up was incomplete: " + "; ".join(problems) + "."
            error.details["cleanup_problems"] = problems
            error.args = (error.msg,)
        if error is exc:
            raise
        raise error from exc
    return results


class _BackupRun:
    """One run of run_backup_jobs: what has been created so far, so abort() undoes exactly that."""

    def __init__(self, qmp: QmpClient, jobs: list[DiskJob]) -> None:
        self.qmp = qmp
        self.jobs = jobs
        self.created: list[str] = []
        self.opened: list[str] = []
        self.sent = False
        self.started_at = 0.0

    def label(self, job: DiskJob) -> str:
        return f"node {job.node} ({job.job_id})"

    def preflight(self) -> None:
        """Refusals QEMU would give only halfway: bitmaps to add that exist, bitmaps to use that cannot be trusted."""
        nodes = self.qmp.execute("query-named-block-nodes", {"flat": True}) or []
        names = {entry.get("node-name") for entry in nodes}
        running = {job.get("id") for job in self.qmp.execute("query-jobs") or []}
        for job in self.jobs:
            if job.job_id in running:
                raise BackupError(
                    f"A job {job.job_id} already exists on this QEMU (left by an interrupted backup?); "
                    "cancel it first (cancel_stale_jobs).",
                    job_id=job.job_id,
                )
            if target_node_name(job.job_id) in names:
                raise BackupError(
                    f"The target node {target_node_name(job.job_id)} of {job.job_id} is still open (left by an "
                    "interrupted backup?); close it first (cancel_stale_jobs).",
                    job_id=job.job_id,
                )
            bitmaps = parse_bitmaps(nodes, job.node)
            state = bitmaps.get(job.bitmap or "")
            if job.sync == "full" and job.bitmap and state is not None:
                raise BackupError(
                    f"The bitmap {job.bitmap} already exists on {job.node}; a full backup starts a new one.",
                    node=job.node,
                    bitmap=job.bitmap,
                )
            if job.sync == "bitmap":
                reason = _unusable(state)
                if reason:
                    raise BackupError(
                        f"Cannot take an incremental backup of {job.node}: its bitmap {job.bitmap} {reason}. "
                        "Nothing was written.",
                        node=job.node,
                        bitmap=job.bitmap,
                    )

    def create_targets(self, qemu_img: QemuImg) -> None:
        for job in self.jobs:
            try:
                fd = os.open(job.target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                reason = (
                    "it already exists (a file or symlink); refusing to overwrite or follow it"
                    if isinstance(exc, FileExistsError)
                    else (exc.strerror or str(exc))
                )
                raise BackupError(f"Cannot create the backup file {job.target}: {reason}.", target=job.target) from None
            self.created.append(job.target)
            # qemu-img writes the file this task created through its fd, never what may be planted at the name;
            # -u: the relative backing name is stored as given, not resolved against /proc (the size is explicit)
            args = ["create", "-q", "-f", "qcow2"]
            if job.backing:
                args += ["-b", backing_reference(job.target, job.backing), "-F", "qcow2", "-u"]
            try:
                qemu_img.run(args + ["--", f"/proc/{os.getpid()}/fd/{fd}", str(job.virtual_size)])
            except VmsnapError as exc:
                raise BackupError(
                    f"Cannot create the backup file {job.target}: {getattr(exc, 'stderr', '').strip() or exc.msg}",
                    target=job.target,
                ) from None
            finally:
                os.close(fd)

    def open_targets(self) -> None:
        for job in self.jobs:
            try:
                self.qmp.execute("blockdev-add", target_blockdev(job))
            except QmpError as exc:
                raise BackupError(
                    f"QEMU cannot open the backup file {job.target} of {self.label(job)}: {exc.desc}", target=job.target
                ) from None
            self.opened.append(target_node_name(job.job_id))

    def start(self) -> None:
        actions, properties = transaction_actions(self.jobs)
        arguments: dict[str, t.Any] = {"actions": actions}
        if properties:
            arguments["properties"] = properties
        self.sent = True
        self.started_at = time.monotonic()
        try:
            self.qmp.execute("transaction", arguments)
        except QmpError as exc:
            disks = ", ".join(job.node for job in self.jobs)
            raise BackupError(
                f"QEMU refused the backup of {disks}: {exc.desc}. The transaction is all-or-nothing: no job started.",
                qmp_error_class=exc.error_class,
            ) from None

    def wait_pending(self, timeout: float) -> list[JobResult]:
        deadline = self.started_at + timeout
        pending_at: dict[str, float] = {}
        progress: dict[str, int] = {}
        ids = {job.job_id for job in self.jobs}
        while True:
            entries = {entry.get("id"): entry for entry in self.qmp.execute("query-jobs") or []}
            failures: dict[str, str] = {}
            for job in self.jobs:
                entry = entries.get(job.job_id)
                reason = job_failure(job, entry)
                if reason is not None:
                    failures[job.job_id] = reason
                elif entry is not None and entry.get("status") == "pending" and job.job_id not in pending_at:
                    pending_at[job.job_id] = time.monotonic()
                    progress[job.job_id] = int(entry.get("total-progress") or 0)
            if failures:
                job_id, reason = first_cause(failures)
                job = next(job for job in self.jobs if job.job_id == job_id)
                raise BackupError(
                    f"The backup of {self.label(job)} failed: {reason}. "
                    + ("Every job of this backup was cancelled." if len(self.jobs) > 1 else "It was cancelled."),
                    node=job.node,
                    job_id=job_id,
                )
            if len(pending_at) == len(self.jobs):
                return [
                    JobResult(job, round(pending_at[job.job_id] - self.started_at, 3), progress[job.job_id])
                    for job in self.jobs
                ]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waiting = [self.label(job) for job in self.jobs if job.job_id not in pending_at]
                raise BackupError(
                    f"The backup of {', '.join(waiting)} timed out after {timeout:g} s and was cancelled.",
                    timed_out=True,
                )
            self.qmp.wait_event(
                lambda event: event.get("event") == "JOB_STATUS_CHANGE" and event.get("data", {}).get("id") in ids,
                min(remaining, _POLL_SECONDS),
            )

    def finalize(self) -> None:
        ids = [job.job_id for job in self.jobs]
        for job in self.jobs:
            entry = self.qmp.query_job(job.job_id)
            if entry is not None and entry.get("status") == "pending":  # a grouped one finalizes all at once
                self.qmp.execute("job-finalize", {"id": job.job_id})
        still = _wait_ended(self.qmp, ids, _FINALIZE_GRACE_SECONDS)
        if still:
            raise BackupError(f"The backup jobs {', '.join(still)} did not conclude after job-finalize.")
        failures = {}
        for job in self.jobs:
            entry = self.qmp.query_job(job.job_id)
            if entry is None or entry.get("error"):
                failures[job.job_id] = job_failure(job, entry) or "unknown error"
        for job_id in ids:
            _ignore_qmp_error(self.qmp, "job-dismiss", {"id": job_id})
        if failures:
            job_id, reason = first_cause(failures)
            raise BackupError(
                f"The backup job {job_id} failed while it was finalized: {reason}. Its bitmap may have been cleared, "
                "so the next backup of this disk must be a full one.",
                job_id=job_id,
            )

    def close_targets(self) -> None:
        """Close each target, which writes QEMU's cached qcow2 metadata: before this the file is not complete."""
        for node in list(self.opened):
            try:
                self.qmp.execute("blockdev-del", {"node-name": node})
            except QmpError as exc:
                raise BackupError(
                    f"QEMU cannot close the backup target {node}: {exc.desc}. The jobs were finalized, so an "
                    "incremental's bitmap is already cleared: the next backup of this disk must be a full one.",
                    node=node,
                ) from None
            self.opened.remove(node)

    def abort(self, qemu_died: bool = False) -> list[str]:
        """Undo what this run did; returns what could not be undone. Never raises.

        qemu_died: the QEMU exited; its jobs, target nodes and a bitmap added at run time went with it.
        """
        problems: list[str] = []
        try:
            if not qemu_died:
                self._abort_jobs(problems)
        except VmsnapError as exc:  # QEMU gone or not answering: only the files can still be removed
            problems.append(f"QEMU could not be told to clean up ({exc.msg})")
        for path in self.created:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"cannot remove {path} ({exc.strerror or exc})")
        return problems

    def _abort_jobs(self, problems: list[str]) -> None:
        ids = [job.job_id for job in self.jobs]
        if self.sent:
            for job in self.qmp.execute("query-jobs") or []:
                if job.get("id") in ids and job.get("status") not in _ENDED:
                    _ignore_qmp_error(self.qmp, "job-cancel", {"id": job["id"]})
            still = _wait_ended(self.qmp, ids, _CANCEL_GRACE_SECONDS)
            for job_id in still:
                problems.append(f"the job {job_id} did not stop after job-cancel")
            for job_id in ids:
                if job_id not in still:
                    _ignore_qmp_error(self.qmp, "job-dismiss", {"id": job_id})
        for node in list(self.opened):
            try:
                self.qmp.execute("blockdev-del", {"node-name": node})
                self.opened.remove(node)
            except QmpError as exc:
                problems.append(f"QEMU cannot close the target node {node} ({exc.desc})")
        if self.sent:
            for job in self.jobs:
                if job.sync == "full" and job.bitmap:
                    try:
                        remove_bitmap(self.qmp, job.node, job.bitmap)
                    except BackupError as exc:
                        problems.append(exc.msg)


def _unusable(state: BitmapState | None) -> str | None:
    if state is None:
        return "does not exist"
    if state.inconsistent:
        return "is inconsistent (its QEMU was killed while it was in use)"
    if not state.recording:
        return "is disabled (does not record writes)"
    if state.busy:
        return "is in use by another job"
    return None


def _ignore_qmp_error(qmp: QmpClient, command: str, arguments: dict[str, t.Any]) -> None:
    """Commands of a clean-up whose refusal only means there is nothing left to do (a job already concluded)."""
    with contextlib.suppress(QmpError):
        qmp.execute(command, arguments)


def _wait_ended(qmp: QmpClient, ids: t.Sequence[str], timeout: float) -> list[str]:
    """Wait until each job is concluded or gone; returns the ids that are not."""
    deadline = time.monotonic() + timeout
    wanted = set(ids)
    while True:
        entries = {job.get("id"): job for job in qmp.execute("query-jobs") or []}
        left = sorted(job_id for job_id in wanted if job_id in entries and entries[job_id].get("status") not in _ENDED)
        remaining = deadline - time.monotonic()
        if not left or remaining <= 0:
            return left
        qmp.wait_event(
            lambda event: event.get("event") == "JOB_STATUS_CHANGE" and event.get("data", {}).get("id") in wanted,
            min(remaining, _POLL_SECONDS),
        )


# ---- the helper storage daemon ------------------------------------------------------------------------------------


def _die_with_parent() -> t.Callable[[], None]:
    """preexec_fn: the daemon gets SIGTERM when the thread that started it ends (the module was killed).

    SIGTERM, not SIGKILL: the daemon then ends its jobs and closes the image as on quit, so a killed module leaves no
    leaked clusters in the disk (a SIGKILLed daemon can: the kill trials found two after one in four kills).

    prctl is looked up before fork; after it is set, a parent that already died is caught by its pid.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return setup


def _private_folder(workdir: str | None) -> str:
    """A fresh 0700 folder for the daemon's socket; the system's temp folder when workdir's path is too long."""
    if workdir is not None and len(os.path.join(workdir, "vmsnap-qsd-xxxxxxxx", "qmp.sock")) <= _MAX_SOCKET_PATH:
        return tempfile.mkdtemp(prefix="vmsnap-qsd-", dir=workdir)
    return tempfile.mkdtemp(prefix="vmsnap-qsd-")


def _connect_daemon(proc: subprocess.Popen[bytes], sock: str, log: str, timeout: float) -> QmpClient:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BackupError(
                f"qemu-storage-daemon exited (rc {proc.returncode}) before it listened: {_tail(log)}",
                rc=proc.returncode,
            )
        if os.path.exists(sock):
            # A private socket this task created: no other task can know it, so no turn to wait for.
            qmp = QmpClient(
                sock, connect_timeout=max(deadline - time.monotonic(), 1.0), command_timeout=timeout, lock_timeout=None
            )
            try:
                qmp.connect()
                return qmp
            except VmsnapError:
                qmp.close()
        if time.monotonic() >= deadline:
            raise BackupError(f"qemu-storage-daemon did not open its QMP socket within {timeout:g} s: {_tail(log)}")
        time.sleep(0.02)


def _tail(log: str) -> str:
    try:
        with open(log, encoding="utf-8", errors="replace") as handle:
            return handle.read()[-2000:].strip() or "(no output)"
    except OSError:
        return "(no output)"


@contextlib.contextmanager
def storage_daemon(
    image: str,
    read_only: bool,
    workdir: str | None = None,
    timeout: float = 30,
    binary: str | None = None,
) -> t.Iterator[tuple[QmpClient, str]]:
    """A qemu-storage-daemon with `image` (qcow2, its backing chain too) opened as node DAEMON_NODE.

    The QMP socket is in a private 0700 temp folder (under workdir when its path is short enough). The daemon gets
    PR_SET_PDEATHSIG=SIGTERM: it quits with the thread that started it, so start it from the thread that uses it (a
    pool's worker thread ends with the pool). Yields (client, node name). On exit: blockdev-del + quit, which stores
    the bitmaps and clears their in-use flag; a daemon that has to be killed, or was killed, leaves its writable
    bitmaps in-use (inconsistent). A close that was not clean raises BackupError unless the body raised already.
    binary: the path of qemu-storage-daemon (module.get_bin_path), else it is looked up on PATH.
    """
    program = binary or shutil.which("qemu-storage-daemon")
    if not program:
        raise BackupError(
            "qemu-storage-daemon was not found; it is part of QEMU (Debian and Ubuntu: package qemu-system-common, "
            "Fedora and RHEL: qemu-storage-daemon). Offline incremental backups need it."
        )
    folder = _private_folder(workdir)
    sock = os.path.join(folder, "qmp.sock")
    log = os.path.join(folder, "daemon.log")
    chardev = "socket,id=vmsnap-qmp,server=on,wait=off,path=" + sock.replace(",", ",,")
    argv = [program, "--chardev", chardev, "--monitor", "chardev=vmsnap-qmp"]
    proc: subprocess.Popen[bytes] | None = None
    qmp: QmpClient | None = None
    body_failed = False
    try:
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, **C_LOCALE),
                preexec_fn=_die_with_parent(),
                close_fds=True,
            )
        qmp = _connect_daemon(proc, sock, log, timeout)
        _open_image(qmp, image, read_only)
        try:
            yield qmp, DAEMON_NODE
        except BaseException:
            body_failed = True
            raise
    finally:
        problem = _stop_daemon(proc, qmp)
        shutil.rmtree(folder, ignore_errors=True)
    if problem and not body_failed:
        raise BackupError(
            f"The helper qemu-storage-daemon on {image} did not close cleanly ({problem}); if it had the image open "
            "for writing, its bitmaps are now marked in-use and the next backup of it will be a full one.",
            image=image,
        )


def _open_image(qmp: QmpClient, image: str, read_only: bool) -> None:
    try:
        qmp.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": DAEMON_NODE,
                "read-only": read_only,
                "file": {"driver": "file", "filename": image},
            },
        )
    except QmpError as exc:
        if is_lock_error(exc.desc):
            raise ImageInUseError(
                f"Image {image} is in use by another process (a running QEMU?): {exc.desc}", image_path=image
            ) from None
        raise BackupError(f"qemu-storage-daemon cannot open {image}: {exc.desc}", image=image) from None


def _stop_daemon(proc: subprocess.Popen[bytes] | None, qmp: QmpClient | None) -> str | None:
    """Close the image and quit; kill only a daemon that does not go. Returns what went wrong, or None."""
    if proc is None:
        return None
    problem: str | None = None
    if qmp is not None:
        try:
            nodes = {entry.get("node-name") for entry in qmp.execute("query-named-block-nodes", {"flat": True}) or []}
            if DAEMON_NODE in nodes:
                qmp.execute("blockdev-del", {"node-name": DAEMON_NODE}, timeout=_DAEMON_CLOSE_SECONDS)
            with contextlib.suppress(VmsnapError):  # the daemon may close the socket before it answers
                qmp.execute("quit", timeout=_DAEMON_CLOSE_SECONDS)
        except VmsnapError as exc:
            problem = exc.msg
        finally:
            qmp.close()
    if proc.poll() is None and (qmp is None or problem is not None):
        proc.terminate()  # SIGTERM still closes the images cleanly
    try:
        proc.wait(_DAEMON_CLOSE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return problem or f"it did not exit within {_DAEMON_CLOSE_SECONDS:g} s and was killed"
    if proc.returncode not in (0, -signal.SIGTERM):
        return problem or f"it exited with {proc.returncode}"
    return problem
