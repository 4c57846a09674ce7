# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The QMP client against a fake QMP server on a real Unix socket, and once against a real QEMU."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import (
    QmpClient,
    QmpConnectionError,
    QmpError,
    QmpJobError,
    QmpTimeoutError,
)
from ansible_collections.vmsnap.qemu.tests.unit.plugins.module_utils.qmp_fakes import FakeQmp, reply


def test_commands_events_and_version(serve) -> None:
    def handler(message, server):
        event = {"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}
        return [event, reply(message, {"status": "running", "running": True})]

    server = serve(handler)
    with QmpClient(server.path) as qmp:
        assert qmp.version == (7, 2, 22)
        assert qmp.execute("query-status") == {"status": "running", "running": True}
        assert [e["event"] for e in qmp.events] == ["STOP"]
    assert server.commands() == ["qmp_capabilities", "query-status"]


def test_errors_become_qmp_error(serve) -> None:
    def handler(message, server):
        return [{"error": {"class": "GenericError", "desc": "Snapshot 'a' already exists"}, "id": message["id"]}]

    with QmpClient(serve(handler).path) as qmp, pytest.raises(QmpError) as info:
        qmp.execute("snapshot-save", {"job-id": "j", "tag": "a", "vmstate": "d", "devices": ["d"]})
    assert info.value.error_class == "GenericError"
    assert "QMP snapshot-save failed: Snapshot 'a' already exists" in info.value.msg


def test_large_replies_are_buffered(serve) -> None:
    big = [{"name": "x" * 1000, "n": i} for i in range(300)]  # about 300 KiB on one line
    with QmpClient(serve(lambda m, s: [reply(m, big)]).path) as qmp:
        assert qmp.execute("query-named-block-nodes") == big


def test_a_server_that_never_greets_times_out_clearly(serve) -> None:
    server = serve(lambda m, s: [], greet=False)
    started = time.monotonic()
    expected = f"No QMP greeting from {server.path} within 0.5 s: another client probably holds the socket"
    with pytest.raises(QmpTimeoutError, match=expected):
        QmpClient(server.path, connect_timeout=0.5).connect()
    assert time.monotonic() - started < 3


def test_a_server_that_never_answers_times_out_per_command(serve) -> None:
    expected = "waiting for the reply to query-status"
    with (
        QmpClient(serve(lambda m, s: []).path, command_timeout=0.3) as qmp,
        pytest.raises(QmpTimeoutError, match=expected),
    ):
        qmp.execute("query-status")


def test_a_dropped_connection_is_reported(serve) -> None:
    with (
        QmpClient(serve(lambda m, s: None).path) as qmp,
        pytest.raises(QmpConnectionError, match="closed the connection"),
    ):
        qmp.execute("query-status")


def test_missing_path_and_non_socket(tmp_path) -> None:
    with pytest.raises(QmpConnectionError, match="does not exist"):
        QmpClient(str(tmp_path / "nope.sock")).connect()
    regular = tmp_path / "file"
    regular.write_text("")
    with pytest.raises(QmpConnectionError, match="is not a socket"):
        QmpClient(str(regular)).connect()


def test_a_socket_nobody_listens_on(tmp_path) -> None:
    path = str(tmp_path / "dead.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, as after a QEMU that died
    with pytest.raises(QmpConnectionError, match="Is its QEMU still running"):
        QmpClient(path).connect()


class JobServer:
    """A job that goes created -> running -> concluded after `steps` query-jobs polls, optionally with an error."""

    def __init__(self, steps: int, error: str | None = None, events: bool = True) -> None:
        self.steps = steps
        self.error = error
        self.events = events
        self.status = "none"

    def __call__(self, message: dict, server: FakeQmp) -> list[dict]:
        command = message["execute"]
        if command == "snapshot-save":
            self.status = "running"
            out = [reply(message, {})]
            if self.events:
                out.insert(0, {"event": "JOB_STATUS_CHANGE", "data": {"id": "j1", "status": "running"}})
            return out
        if command == "query-jobs":
            if self.status == "running":
                self.steps -= 1
                if self.steps <= 0:
                    self.status = "concluded"
            if self.status in ("none", "dismissed"):
                return [reply(message, [])]
            job = {"id": "j1", "type": "snapshot-save", "status": self.status}
            if self.status == "concluded" and self.error:
                job["error"] = self.error
            return [reply(message, [job])]
        if command == "job-dismiss":
            self.status = "dismissed"
            return [reply(message, {})]
        raise AssertionError(command)


@pytest.mark.parametrize("events", [True, False])
def test_job_waits_then_dismisses(serve, events: bool) -> None:
    server = serve(JobServer(steps=3, events=events))
    with QmpClient(server.path) as qmp:
        job = qmp.run_job("snapshot-save", {"job-id": "j1", "tag": "a", "vmstate": "d", "devices": ["d"]}, timeout=10)
    assert job["status"] == "concluded"
    assert server.commands()[-1] == "job-dismiss"


def test_job_error_is_raised_after_dismissal(serve) -> None:
    server = serve(JobServer(steps=1, error="Device 'd' is writable but does not support snapshots"))
    with QmpClient(server.path) as qmp, pytest.raises(QmpJobError, match="does not support snapshots"):
        qmp.run_job("snapshot-save", {"job-id": "j1", "tag": "a", "vmstate": "d", "devices": ["d"]}, timeout=10)
    assert "job-dismiss" in server.commands()


def test_job_timeout_says_it_is_still_running(serve) -> None:
    server = serve(JobServer(steps=10**6))
    with QmpClient(server.path) as qmp, pytest.raises(QmpTimeoutError, match="j1 is still running"):
        qmp.run_job("snapshot-save", {"job-id": "j1", "tag": "a", "vmstate": "d", "devices": ["d"]}, timeout=1)
    assert "job-dismiss" not in server.commands()


def test_a_job_that_vanishes_is_not_reported_as_done(serve) -> None:
    class Vanishing(JobServer):
        def __call__(self, message: dict, server: FakeQmp) -> list[dict]:
            if message["execute"] == "query-jobs" and self.status == "running":
                self.status = "dismissed"  # someone else dismissed it before this client read its result
            return super().__call__(message, server)

    server = serve(Vanishing(steps=10))
    with QmpClient(server.path) as qmp, pytest.raises(QmpJobError, match="disappeared .* succeeded is unknown"):
        qmp.run_job("snapshot-save", {"job-id": "j1", "tag": "a", "vmstate": "d", "devices": ["d"]}, timeout=5)
    assert "job-dismiss" not in server.commands()


class ReadyJobServer:
    """An active commit: running -> ready after a delay; after job-complete, concluded 0.3 s later."""

    def __init__(self, ready_after: float) -> None:
        self.ready_at = 0.0
        self.ready_after = ready_after
        self.concluded_at = float("inf")
        self.status = "none"

    def __call__(self, message: dict, server: FakeQmp) -> list[dict]:
        command = message["execute"]
        if command == "block-commit":
            self.status, self.ready_at = "running", time.monotonic() + self.ready_after
        elif command == "query-jobs":
            if self.status == "running" and time.monotonic() >= self.ready_at:
                self.status = "ready"
            if self.status == "completing" and time.monotonic() >= self.concluded_at:
                self.status = "concluded"
            if self.status == "dismissed":
                return [reply(message, [])]
            return [reply(message, [{"id": "c1", "type": "commit", "status": self.status}])]
        elif command == "job-complete":
            assert self.status == "ready", self.status
            self.status, self.concluded_at = "completing", time.monotonic() + 0.3
        elif command == "job-dismiss":
            self.status = "dismissed"
        return [reply(message, {})]


def test_a_job_ready_near_the_deadline_is_still_completed(serve) -> None:
    server = serve(ReadyJobServer(ready_after=1.2))
    with QmpClient(server.path) as qmp:
        job = qmp.run_job("block-commit", {"job-id": "c1", "device": "d"}, timeout=1.5, complete_when_ready=True)
    assert job["status"] == "concluded"  # the switch-over after job-complete got time beyond the deadline
    assert "job-complete" in server.commands() and server.commands()[-1] == "job-dismiss"


def test_a_job_never_ready_times_out_within_its_timeout(serve) -> None:
    server = serve(ReadyJobServer(ready_after=60))
    started = time.monotonic()
    with QmpClient(server.path) as qmp, pytest.raises(QmpTimeoutError, match="c1 is still running"):
        qmp.run_job("block-commit", {"job-id": "c1", "device": "d"}, timeout=1, complete_when_ready=True)
    assert time.monotonic() - started < 3  # one timeout, not two
    assert "job-complete" not in server.commands()


def test_commands_still_block_after_polling_for_events(serve) -> None:
    big = "x" * 4_000_000  # larger than a socket buffer: a non-blocking send would fail half-way

    def handler(message, server):
        return [reply(message, len(message.get("arguments", {}).get("blob", "")))]

    with QmpClient(serve(handler).path) as qmp:
        qmp.poll_events()
        assert qmp.execute("echo", {"blob": big}) == len(big)


def test_against_a_real_qemu(tmp_path) -> None:
    image = str(tmp_path / "d.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "16M"], check=True)
    sock = str(tmp_path / "qmp.sock")
    vm = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "kvm", "-accel", "tcg", "-m", "64", "-nodefaults", "-display", "none",
         "-blockdev", f"driver=file,filename={image},node-name=file0",
         "-blockdev", "driver=qcow2,file=file0,node-name=disk0",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.02)
        with QmpClient(sock) as qmp:
            assert qmp.version >= (6, 0, 0)
            assert qmp.execute("query-status")["status"] == "running"
            args = {"job-id": "save1", "tag": "live", "vmstate": "disk0", "devices": ["disk0"]}
            assert qmp.run_job("snapshot-save", args, timeout=60)["status"] == "concluded"
            assert qmp.query_job("save1") is None  # dismissed
            with pytest.raises(QmpJobError, match="already exists"):
                qmp.run_job("snapshot-save", dict(args, **{"job-id": "save2"}), timeout=60)
            qmp.run_job("snapshot-delete", {"job-id": "del1", "tag": "live", "devices": ["disk0"]}, timeout=60)
            qmp.execute("quit")
        vm.wait(30)
    finally:
        vm.kill()
        vm.wait()
