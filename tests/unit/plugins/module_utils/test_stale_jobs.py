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
    mark_paused,
    orphaned_owner,
    pause_marker_cleared,
    resume_left_paused,
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


class PausedQmp:
    """qom-list /objects, query-status and query-migrate answers; cont and object-del change them as QEMU would."""

    def __init__(self, markers: list[str], status: str, migration: str | None = None) -> None:
        self.objects = [{"name": "pc.ram", "type": "child<memory-backend-ram>"}] + [
            {"name": name, "type": "child<secret>"} for name in markers
        ]
        self.status = status
        self.migration = migration
        self.sent: list[str] = []

    def execute(self, command: str, arguments: dict[str, t.Any] | None = None, **dummy: t.Any) -> t.Any:
        self.sent.append(command)
        if command == "qom-list":
            return list(self.objects)
        if command == "query-status":
            return {"status": self.status, "running": self.status == "running"}
        if command == "query-migrate":
            return {"status": self.migration} if self.migration else {}
        if command == "cont":
            self.status = "running"
        elif command == "object-del":
            self.objects = [o for o in self.objects if o["name"] != (arguments or {})["id"]]
        return {}


def test_resume_left_paused() -> None:
    dead = _dead_pid()
    for status in ("paused", "postmigrate"):
        qmp = PausedQmp([f"vmsnap-paused-{dead}"], status)
        notes = resume_left_paused(t.cast(t.Any, qmp), check_mode=False)
        assert qmp.status == "running" and [o["name"] for o in qmp.objects] == ["pc.ram"]
        assert len(notes) == 1 and f"pid {dead}" in notes[0] and "it was resumed" in notes[0]
    # Resumed by someone since: only the marker goes.
    qmp = PausedQmp([f"vmsnap-paused-{dead}"], "running")
    assert resume_left_paused(t.cast(t.Any, qmp), check_mode=False) == []
    assert "cont" not in qmp.sent and [o["name"] for o in qmp.objects] == ["pc.ram"]
    # Check mode, a save still being written, a task that still runs, another tool's pause: nothing is touched.
    for markers, migration, check_mode in (
        ([f"vmsnap-paused-{dead}"], None, True),
        ([f"vmsnap-paused-{dead}"], "active", False),
        ([f"vmsnap-paused-{os.getppid()}"], None, False),
        ([], None, False),
        (["vmsnap-paused-x", "other-secret"], None, False),
    ):
        qmp = PausedQmp(markers, "paused", migration)
        notes = resume_left_paused(t.cast(t.Any, qmp), check_mode=check_mode)
        assert qmp.status == "paused" and "cont" not in qmp.sent and "object-del" not in qmp.sent, markers
        assert len(notes) == (1 if markers and str(dead) in markers[0] else 0), (markers, notes)
        if check_mode:
            assert "the real run resumes it first" in notes[0]
        elif migration:
            assert "still active" in notes[0]


class SavingQmp(PausedQmp):
    """A killed task's state save that is still written for two more queries, then completes (QEMU: postmigrate)."""

    def __init__(self, markers: list[str]) -> None:
        super().__init__(markers, "paused", "active")
        self.queries_left = 2

    def execute(self, command: str, arguments: dict[str, t.Any] | None = None, **dummy: t.Any) -> t.Any:
        if command == "query-migrate" and self.migration == "active":
            self.queries_left -= 1
            if self.queries_left < 0:
                self.migration, self.status = "completed", "postmigrate"
        return super().execute(command, arguments)


def test_a_guest_paused_by_a_killed_save_is_resumed_once_the_save_has_ended(monkeypatch: t.Any) -> None:
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    dead = _dead_pid()
    qmp = SavingQmp([f"vmsnap-paused-{dead}"])
    notes = resume_left_paused(t.cast(t.Any, qmp), check_mode=False, timeout=60)
    assert qmp.sent.index("cont") > max(i for i, c in enumerate(qmp.sent) if c == "query-migrate")
    assert qmp.status == "running" and [o["name"] for o in qmp.objects] == ["pc.ram"]
    assert len(notes) == 1 and "(status postmigrate); it was resumed" in notes[0]


def test_pause_marker_names_this_process() -> None:
    qmp = PausedQmp([], "running")
    calls: list[tuple[str, t.Any]] = []
    qmp.execute = lambda command, arguments=None, **dummy: calls.append((command, arguments))  # type: ignore[method-assign]
    mark_paused(t.cast(t.Any, qmp))
    with pause_marker_cleared(t.cast(t.Any, qmp)):
        pass
    marker = f"vmsnap-paused-{os.getpid()}"
    assert calls == [
        ("object-add", {"qom-type": "secret", "id": marker, "data": "vmsnap"}),
        ("object-del", {"id": marker}),
    ]
