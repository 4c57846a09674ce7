# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The QMP client against a fake QMP server on a real Unix socket, and once against a real QEMU."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import socket
import subprocess
import threading
import time

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils import _qmp
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import LockTimeoutError
from ansible_collections.vmsnap.qemu.plugins.module_utils._lock import vm_lock_file_for
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import (
    QmpClient,
    QmpConnectionError,
    QmpError,
    QmpJobError,
    QmpTimeoutError,
    QmpVmDiedError,
    pause_ms,
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


# --- taking turns on one socket ----------------------------------------------------------------------------------


class SerialQmp:
    """A QMP server that, like QEMU, serves one client after the other; logs (client number, command)."""

    def __init__(self, path: str) -> None:
        self.log: list[tuple[int, str]] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client = 0
        while True:
            try:
                conn, dummy = self.server.accept()
            except OSError:
                return
            client += 1
            with conn:
                conn.sendall(json.dumps(GREETING).encode() + b"\n")
                for line in conn.makefile("rb"):
                    message = json.loads(line)
                    self.log.append((client, message["execute"]))
                    time.sleep(0.01)
                    conn.sendall(json.dumps({"return": {}, "id": message["id"]}).encode() + b"\n")


GREETING = {"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}


def _hold_vm(path: str, locks: str, seconds: float, ready) -> None:
    with QmpClient(path, lock_dir=locks) as qmp:
        qmp.execute("query-status")
        ready.set()
        time.sleep(seconds)
        qmp.execute("query-block")


@pytest.fixture
def vm_holder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = []

    def start(path: str, seconds: float):
        ready = ctx.Event()
        proc = ctx.Process(target=_hold_vm, args=(path, str(tmp_path / "locks"), seconds, ready))
        proc.start()
        procs.append(proc)
        assert ready.wait(10)
        return proc

    yield start
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0


def test_a_second_task_waits_its_turn_and_never_interleaves(tmp_path, vm_holder) -> None:
    path = str(tmp_path / "vm.sock")
    server = SerialQmp(path)
    vm_holder(path, seconds=0.6)
    started = time.monotonic()
    with QmpClient(path, connect_timeout=0.5, lock_timeout=10, lock_dir=str(tmp_path / "locks")) as qmp:
        waited = time.monotonic() - started
        qmp.execute("query-status")
    assert waited >= 0.4  # it waited for the holder instead of failing after connect_timeout
    clients = [client for client, dummy in server.log]
    assert clients == sorted(clients)  # all of the first client's commands, then all of the second's
    assert [c for c, cmd in server.log if c == 1] == [1, 1, 1] and [c for c, d in server.log if c == 2] == [2, 2]


def test_a_waiter_that_runs_out_names_the_holder_and_sends_nothing(tmp_path, vm_holder) -> None:
    path = str(tmp_path / "vm.sock")
    server = SerialQmp(path)
    proc = vm_holder(path, seconds=1.5)
    locks = str(tmp_path / "locks")
    started = time.monotonic()
    with pytest.raises(LockTimeoutError) as info:
        QmpClient(path, lock_timeout=0.3, lock_dir=locks).connect()
    assert 0.25 <= time.monotonic() - started < 1.2
    assert info.value.msg.startswith(
        f"Another vmsnap.qemu task is using the VM behind {path} (held by pid {proc.pid} ("
    )
    assert "still busy after lock_timeout 0.3 s" in info.value.msg and "Nothing was changed" in info.value.msg
    assert info.value.details["lock_file"] == vm_lock_file_for(path, locks)
    proc.join(10)
    assert {client for client, dummy in server.log} == {1}  # the waiter never reached the socket


def test_a_failed_connect_releases_the_turn(serve, tmp_path) -> None:
    server = serve(lambda m, s: [], greet=False)
    locks = str(tmp_path / "locks")
    client = QmpClient(server.path, connect_timeout=0.3, lock_dir=locks)
    with pytest.raises(QmpTimeoutError, match="another client probably holds the socket"), client:
        pass
    assert not os.path.exists(vm_lock_file_for(server.path, locks))


def test_no_lock_for_private_sockets(serve, tmp_path) -> None:
    server = serve(lambda m, s: [reply(m, {})])
    locks = tmp_path / "locks"
    with QmpClient(server.path, lock_timeout=None, lock_dir=str(locks)) as qmp:
        qmp.execute("query-status")
        assert not locks.exists()


# --- a QEMU that dies, and one that only hangs up ------------------------------------------------------------------


def _peer(path: str, action: str, ready) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    ready.set()
    conn, dummy = server.accept()
    conn.sendall(json.dumps(GREETING).encode() + b"\n")
    lines = conn.makefile("rb")
    message = json.loads(lines.readline())
    conn.sendall(json.dumps({"return": {}, "id": message["id"]}).encode() + b"\n")
    lines.readline()  # the next command: now die, or hang up and live on
    if action == "die":
        os._exit(0)
    conn.shutdown(socket.SHUT_RDWR)
    time.sleep(3)
    os._exit(0)


@pytest.mark.parametrize("action", ["die", "hang-up"])
def test_a_qemu_that_dies_while_we_wait_is_reported_as_died(tmp_path, action: str) -> None:
    path = str(tmp_path / "qmp.sock")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_peer, args=(path, action, ready))
    proc.start()
    try:
        assert ready.wait(10)
        with QmpClient(path, lock_timeout=None) as qmp, pytest.raises(QmpConnectionError) as info:
            qmp.execute("query-status")
    finally:
        proc.kill()
        proc.join()
    if action == "die":
        assert isinstance(info.value, QmpVmDiedError)
        assert info.value.msg.startswith(
            f"QEMU (pid {proc.pid}) behind {path} exited while we waited for the reply to query-status: the VM died"
        )
        assert info.value.details["vm_died"] is True
    else:
        assert not isinstance(info.value, QmpVmDiedError)
        assert info.value.msg == f"QEMU closed the connection {path} while we waited for the reply to query-status."


# --- limits and odd shapes -----------------------------------------------------------------------------------------


def _raw(serve, *payloads: bytes):
    """A fake server that answers the first command after qmp_capabilities with raw bytes."""

    def handler(message, server):
        for payload in payloads:
            server.conn.sendall(payload.replace(b"ID", json.dumps(message["id"]).encode()))
        return []

    return serve(handler)


def test_an_endless_line_is_cut_off_at_the_cap(serve, monkeypatch) -> None:
    monkeypatch.setattr(_qmp, "MAX_MESSAGE_BYTES", 1 << 20)
    chunk = b"x" * 65536

    def handler(message, server):
        with contextlib.suppress(OSError):
            for dummy in range(200):  # 12.5 MiB, far past the (lowered) cap; the client hangs up first
                server.conn.sendall(chunk)
        return []

    qmp = QmpClient(serve(handler).path, command_timeout=10, lock_timeout=None)
    qmp.connect()
    with pytest.raises(QmpConnectionError, match="sent more than 1048576 bytes without ending the message"):
        qmp.execute("guest-file-read")
    assert qmp._sock is None  # closed: the rest of the stream is never read


def test_a_message_longer_than_the_cap_is_refused(serve, monkeypatch) -> None:
    monkeypatch.setattr(_qmp, "MAX_MESSAGE_BYTES", 1 << 20)
    long_reply = b'{"return": "' + b"x" * ((1 << 20) + 10) + b'", "id": ID}\n'
    qmp = QmpClient(_raw(serve, long_reply).path, command_timeout=10, lock_timeout=None)
    qmp.connect()
    expected = "sent (a message of )?more than 1048576 bytes .*The connection was closed"
    with pytest.raises(QmpConnectionError, match=expected):
        qmp.execute("query-status")
    assert qmp._sock is None


def test_the_cap_is_above_the_largest_real_message() -> None:
    largest = (16 << 20) * 4 // 3  # a guest agent's guest-exec-status output, base64
    assert 2 * largest < _qmp.MAX_MESSAGE_BYTES


def test_deeply_nested_json_is_an_error_of_the_family(serve) -> None:
    deep = b'{"return": ' + b"[" * 200000 + b"]" * 200000 + b', "id": ID}\n'
    expected = "sent something that is not QMP JSON"
    with QmpClient(_raw(serve, deep).path, lock_timeout=None) as qmp, pytest.raises(QmpConnectionError, match=expected):
        qmp.execute("query-status")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"error": "no class", "id": ID}\n', "QMP query-status failed: no class (GenericError)"),
        (b'{"error": {}, "id": ID}\n', "QMP query-status failed:  (GenericError)"),
        (b'{"error": [1, 2], "id": ID}\n', "QMP query-status failed: [1, 2] (GenericError)"),
    ],
)
def test_odd_errors_are_qmp_errors(serve, payload: bytes, expected: str) -> None:
    with QmpClient(_raw(serve, payload).path, lock_timeout=None) as qmp, pytest.raises(QmpError) as info:
        qmp.execute("query-status")
    assert info.value.msg == expected


def test_odd_return_shapes_are_refused_where_a_shape_is_expected(serve) -> None:
    expected = "answered query-jobs with dict where QMP returns list"
    server = _raw(serve, b'{"return": {"id": "j1"}, "id": ID}\n')
    with QmpClient(server.path, lock_timeout=None) as qmp, pytest.raises(QmpConnectionError, match=expected):
        qmp.query_job("j1")


def test_odd_job_entries_and_event_data_are_skipped(serve) -> None:
    def handler(message, server):
        odd_event = {"event": "JOB_STATUS_CHANGE", "data": "odd"}
        return [odd_event, reply(message, ["odd", {"id": "j1", "status": "concluded"}])]

    with QmpClient(serve(handler).path, lock_timeout=None) as qmp:
        assert qmp.wait_job("j1", ("concluded",), timeout=2) == "concluded"


@pytest.mark.parametrize(
    "greeting",
    [
        b'{"QMP": "odd"}\n',
        b"[1]\n",
        b'{"QMP": {"version": "x"}}\n',
        b'{"QMP": {"version": {"qemu": {"major": "x"}}}}\n',
    ],
)
def test_odd_greetings(tmp_path, greeting: bytes) -> None:
    path = str(tmp_path / "odd.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve_once() -> None:
        conn, dummy = server.accept()
        conn.sendall(greeting)
        line = conn.makefile("rb").readline()
        if line:
            conn.sendall(json.dumps({"return": {}, "id": json.loads(line)["id"]}).encode() + b"\n")
        time.sleep(0.5)
        conn.close()

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    try:
        qmp = QmpClient(path, lock_timeout=None)
        if greeting.startswith(b'{"QMP": {'):
            with qmp:
                assert qmp.version == (0, 0, 0)
        else:
            with pytest.raises(QmpConnectionError, match="did not greet like a QMP monitor|not a QMP message"):
                qmp.connect()
    finally:
        thread.join(5)
        server.close()


def test_events_without_timestamps_count_as_nothing() -> None:
    events = [
        {"event": "STOP"},
        {"event": "RESUME", "timestamp": "odd"},
        {"event": "STOP", "timestamp": {"seconds": "x"}},
    ]
    assert pause_ms(events) == 0.0
