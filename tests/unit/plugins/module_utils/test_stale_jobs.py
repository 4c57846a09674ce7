# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What a killed qmp_live_snapshot task leaves and the next run finishes (the real thing: tests/vm/test_kill_trials.py).

The job bookkeeping is pure logic over query-jobs answers, so a scripted stand-in for the QMP client is enough here."""

from __future__ import annotations

import os
import subprocess
import typing as t
from pathlib import Path

from ansible_collections.vmsnap.qemu.plugins.module_utils._stale_jobs import (
    finish_orphaned_jobs,
    is_unused_claim,
    orphaned_owner,
)


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_orphaned_owner_only_for_live_snapshot_jobs_of_gone_processes() -> None:
    dead = _dead_pid()
    assert orphaned_owner(f"vmsnap-commit-{dead}-17") == dead
    assert orphaned_owner(f"vmsnap-save-{dead}-1") == dead
    assert orphaned_owner(f"vmsnap-commit-{os.getpid()}-17") is None  # this process's own job
    assert orphaned_owner(f"vmsnap-load-{os.getppid()}-17") is None  # its task still runs
    assert orphaned_owner(f"vmsnap-backup-{dead}-1") is None  # qcow2_backup cleans its own
    for odd in (None, 17, "", "commit-1-2", f"vmsnap-commit-{dead}", f"xvmsnap-commit-{dead}-1", {"id": 1}):
        assert orphaned_owner(odd) is None


def test_is_unused_claim(tmp_path: Path) -> None:
    empty, full, folder = tmp_path / "empty", tmp_path / "full", tmp_path / "folder"
    empty.write_bytes(b"")
    full.write_bytes(b"QFI")
    folder.mkdir()
    link = tmp_path / "link"
    link.symlink_to(empty)
    assert is_unused_claim(str(empty))
    for path in (full, folder, link, tmp_path / "missing"):
        assert not is_unused_claim(str(path)), path


class ScriptedQmp:
    """query-jobs answers from a list that the commands change as QEMU would."""

    def __init__(self, jobs: list[dict[str, t.Any]]) -> None:
        self.jobs = jobs
        self.sent: list[tuple[str, t.Any]] = []

    def execute(self, command: str, arguments: dict[str, t.Any] | None = None, **dummy: t.Any) -> t.Any:
        self.sent.append((command, arguments))
        if command == "query-jobs":
            return [dict(job) for job in self.jobs]
        job = next(job for job in self.jobs if job["id"] == (arguments or {}).get("id"))
        if command == "job-complete":
            job["status"] = "concluded"
        elif command == "job-dismiss":
            self.jobs.remove(job)
        return {}

    def wait_job(self, job_id: str, statuses: t.Collection[str], timeout: float) -> str:
        job = next(job for job in self.jobs if job["id"] == job_id)
        if job["status"] == "running":
            job["status"] = "ready" if job["type"] == "commit" else "concluded"
        return str(job["status"])

    def query_job(self, job_id: str) -> dict[str, t.Any] | None:
        return next((job for job in self.jobs if job["id"] == job_id), None)


def test_finish_orphaned_jobs() -> None:
    dead = _dead_pid()
    jobs = [
        {"id": f"vmsnap-commit-{dead}-1", "type": "commit", "status": "ready"},
        {"id": f"vmsnap-save-{dead}-2", "type": "snapshot-save", "status": "concluded", "error": "No space left"},
        {"id": f"vmsnap-delete-{dead}-3", "type": "snapshot-delete", "status": "running"},
        {"id": f"vmsnap-load-{dead}-4", "type": "snapshot-load", "status": "paused"},  # someone paused it: left
        {"id": f"vmsnap-commit-{os.getppid()}-5", "type": "commit", "status": "ready"},  # its task runs: left
        {"id": f"vmsnap-backup-{dead}-6", "type": "backup", "status": "pending"},  # qcow2_backup's: left
        {"id": "other-tool", "type": "mirror", "status": "ready"},
    ]
    qmp = ScriptedQmp(jobs)
    notes = finish_orphaned_jobs(t.cast(t.Any, qmp), 10)
    assert [job["id"] for job in qmp.jobs] == [
        f"vmsnap-load-{dead}-4",
        f"vmsnap-commit-{os.getppid()}-5",
        f"vmsnap-backup-{dead}-6",
        "other-tool",
    ]
    assert ("job-complete", {"id": f"vmsnap-commit-{dead}-1"}) in qmp.sent
    assert [command for command, dummy in qmp.sent].count("job-complete") == 1
    assert len(notes) == 3
    assert f"commit job vmsnap-commit-{dead}-1" in notes[0] and "completed and dismissed" in notes[0]
    assert "it had failed: No space left" in notes[1]
    assert "status running" in notes[2] and "it had succeeded" in notes[2]
