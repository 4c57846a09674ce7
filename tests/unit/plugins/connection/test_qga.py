# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The qga connection plugin: its pure helpers, and the plugin against a fake guest agent on a real Unix socket.

The fake agent (FakeAgent from test_guest_agent.py) speaks the agent's protocol; FakeGuest below plays the guest
behind it: processes that run for a given number of status polls, and files. The real agent is exercised by
tests/vm/test_qga_connection.py.
"""

from __future__ import annotations

import base64
import os
import pathlib
import time
import typing as t

import pytest
from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.playbook.play_context import PlayContext
from ansible.plugins.loader import become_loader, connection_loader, init_plugin_loader
from ansible.utils.collection_loader import AnsibleCollectionConfig

if AnsibleCollectionConfig.collection_finder is None:
    # Plain pytest (PYTHONPATH=<folder holding ansible_collections>): the plugin loader must find the collection, and
    # its finder must be in place before anything from ansible_collections is imported. ansible-test units does this.
    init_plugin_loader([str(pathlib.Path(__file__).resolve().parents[7])])

from ansible_collections.vmsnap.qemu.plugins.connection import qga
from ansible_collections.vmsnap.qemu.tests.unit.plugins.module_utils.test_guest_agent import (
    FakeAgent,
    Message,
    error,
    reply,
    sync_reply,
)

EXEC_AND_FILES = qga.EXEC_COMMANDS + qga.FILE_COMMANDS


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- pure helpers ----------------------------------------------------------------------------------------------


def test_exec_arguments_run_the_command_through_sh_and_pass_stdin_as_base64() -> None:
    assert qga.exec_arguments("echo 'a b'", None) == {
        "path": "/bin/sh",
        "arg": ["-c", "echo 'a b'"],
        "capture-output": True,
    }
    with_stdin = qga.exec_arguments("cat", b"\x00\xffdata")
    assert with_stdin["input-data"] == b64(b"\x00\xffdata")
    assert qga.exec_arguments("cat", b"")["input-data"] == ""  # empty stdin is still closed stdin


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({"exited": True, "exitcode": 0}, (0, b"", b"")),
        (
            {"exited": True, "exitcode": 3, "out-data": b64(b"\xff\x00\x01"), "err-data": b64(b"\x80x\xfe")},
            (3, b"\xff\x00\x01", b"\x80x\xfe"),
        ),
        ({"exited": True, "signal": 9, "out-data": b64(b"partial")}, (137, b"partial", b"")),
        ({"exited": True, "signal": 15, "out-truncated": False, "err-truncated": False}, (143, b"", b"")),
    ],
    ids=["ok-no-output", "exit-code-binary-output", "killed", "terminated"],
)
def test_decode_exec_status(status: dict[str, t.Any], expected: tuple[int, bytes, bytes]) -> None:
    assert qga.decode_exec_status(status, 42) == expected


@pytest.mark.parametrize(
    ("flags", "streams"),
    [
        ({"out-truncated": True}, "standard output was cut off"),
        ({"err-truncated": True}, "standard error was cut off"),
        ({"out-truncated": True, "err-truncated": True}, "standard output and standard error were cut off"),
    ],
)
def test_output_the_agent_cut_off_is_an_error_not_a_partial_result(flags: dict[str, bool], streams: str) -> None:
    status = {"exited": True, "exitcode": 0, "out-data": b64(b"x" * 10), **flags}
    with pytest.raises(AnsibleError) as info:
        qga.decode_exec_status(status, 42)
    assert streams in info.value.message
    assert "16 MiB" in info.value.message and "guest process 42" in info.value.message


def test_a_status_that_is_not_final_or_has_no_result_is_an_error() -> None:
    with pytest.raises(AnsibleError, match="has not exited yet"):
        qga.decode_exec_status({"exited": False}, 7)
    with pytest.raises(AnsibleError, match="no exit code and no signal"):
        qga.decode_exec_status({"exited": True}, 7)


def test_poll_delay_grows_to_its_cap() -> None:
    delays = [qga.POLL_FIRST]
    for dummy in range(30):
        delays.append(qga.next_poll_delay(delays[-1]))
    assert delays == sorted(delays)
    assert delays[-1] == qga.POLL_MAX
    assert sum(1 for d in delays if d < 0.05) >= 5  # quick commands are seen quickly


def test_missing_commands_are_the_ones_not_listed_as_enabled() -> None:
    info = {
        "version": "7.2.22",
        "supported_commands": [
            {"name": "guest-exec", "enabled": True, "success-response": True},
            {"name": "guest-exec-status", "enabled": False, "success-response": True},
        ],
    }
    assert qga.missing_commands(info, qga.EXEC_COMMANDS) == ["guest-exec-status"]
    assert qga.missing_commands(info, ["guest-file-open"]) == ["guest-file-open"]


# --- the plugin against a fake agent -------------------------------------------------------------------------


class FakeGuest:
    """The guest behind a fake agent: processes finish after `polls` status requests, files live in a dict."""

    def __init__(self, enabled: t.Collection[str] = EXEC_AND_FILES, answer: bool = True) -> None:
        self.enabled = set(enabled)
        self.answer = answer
        self.processes: dict[int, dict[str, t.Any]] = {}
        self.programs: list[dict[str, t.Any]] = []  # what the next guest-exec calls will do, in order
        self.files: dict[str, bytes] = {}
        self.handles: dict[int, dict[str, t.Any]] = {}
        self.short_write = False
        self.wrong_read_count = False
        self.hang_up_on: str | None = None

    def __call__(self, message: Message, server: FakeAgent) -> list[bytes] | None:
        command = message["execute"]
        args = message.get("arguments", {})
        if not self.answer:
            return []
        if command == self.hang_up_on:
            return None
        if command == "guest-sync-delimited":
            return [sync_reply(message)]
        if command == "guest-info":
            known = sorted({*EXEC_AND_FILES, "guest-ping", "guest-info"})
            commands = [{"name": name, "enabled": name in self.enabled, "success-response": True} for name in known]
            return [reply(message, {"version": "7.2.22", "supported_commands": commands})]
        handler = getattr(self, command.replace("-", "_"), None)
        if handler is None:
            return [error(message, f"The command {command} has not been found")]
        try:
            return [reply(message, handler(args))]
        except OSError as exc:
            return [error(message, f"failed to {command}: {exc.strerror}")]

    def guest_exec(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        pid = 1000 + len(self.processes)
        program = self.programs.pop(0) if self.programs else {"polls": 0, "status": {"exitcode": 0}}
        self.processes[pid] = {"args": args, "polls": 0, **program}
        return {"pid": pid}

    def guest_exec_status(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        process = self.processes[args["pid"]]
        process["polls"] += 1
        if process.get("forever") or process["polls"] <= process.get("polls_running", 0):
            return {"exited": False}
        return {"exited": True, **process["status"]}

    def guest_file_open(self, args: dict[str, t.Any]) -> int:
        path, mode = args["path"], args.get("mode", "r")
        if mode.startswith("r") and path not in self.files:
            raise FileNotFoundError(2, "No such file or directory")
        if mode.startswith("w"):
            self.files[path] = b""
        handle = 500 + len(self.handles)
        self.handles[handle] = {"path": path, "mode": mode, "pos": 0, "open": True, "writes": 0, "flushed": False}
        return handle

    def guest_file_write(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        handle = self.handles[args["handle"]]
        data = base64.b64decode(args["buf-b64"])
        if self.short_write and handle["writes"] == 1:
            data = data[: len(data) // 2]
        self.files[handle["path"]] += data
        handle["writes"] += 1
        return {"count": len(data), "eof": False}

    def guest_file_read(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        handle = self.handles[args["handle"]]
        content = self.files[handle["path"]]
        data = content[handle["pos"] : handle["pos"] + args["count"]]
        handle["pos"] += len(data)
        count = len(data) + (1 if self.wrong_read_count and data else 0)
        return {"count": count, "buf-b64": b64(data), "eof": handle["pos"] >= len(content)}

    def guest_file_seek(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        handle = self.handles[args["handle"]]
        assert (args["offset"], args["whence"]) == (0, "end")
        return {"position": len(self.files[handle["path"]]), "eof": False}

    def guest_file_flush(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        self.handles[args["handle"]]["flushed"] = True
        return {}

    def guest_file_close(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        self.handles[args["handle"]]["open"] = False
        return {}


Connect = t.Callable[..., t.Tuple[t.Any, FakeAgent]]


@pytest.fixture
def connect(tmp_path: pathlib.Path) -> t.Iterator[Connect]:
    """connect(guest, **options): a qga Connection to a fake agent serving guest, not yet connected."""
    made: list[tuple[t.Any, FakeAgent]] = []

    def make(guest: FakeGuest, **options: t.Any) -> tuple[t.Any, FakeAgent]:
        server = FakeAgent(str(tmp_path / f"qga{len(made)}.sock"), guest)
        connection = connection_loader.get("vmsnap.qemu.qga", PlayContext())
        connection.set_options(
            direct={"socket": server.path, "connect_timeout": 2.0, "command_timeout": 5.0, **options}
        )
        made.append((connection, server))
        return connection, server

    yield make
    for connection, server in made:
        connection.close()
        server.close()


def test_exec_polls_until_the_process_exited_and_returns_its_bytes(connect: Connect) -> None:
    guest = FakeGuest()
    out, err = os.urandom(4096), b"\x80warning\xff"
    guest.programs.append({"polls_running": 3, "status": {"exitcode": 2, "out-data": b64(out), "err-data": b64(err)}})
    connection, server = connect(guest)
    assert connection.exec_command("printf x; exit 2", in_data=b"\x00in") == (2, out, err)
    assert server.commands() == ["guest-sync-delimited", "guest-info", "guest-exec"] + ["guest-exec-status"] * 4
    sent = guest.processes[1000]["args"]
    assert sent == {
        "path": "/bin/sh",
        "arg": ["-c", "printf x; exit 2"],
        "capture-output": True,
        "input-data": b64(b"\x00in"),
    }


def test_a_command_past_its_timeout_fails_with_its_pid_and_is_not_killed(connect: Connect) -> None:
    guest = FakeGuest()
    guest.programs.append({"forever": True, "status": {}})
    connection, server = connect(guest, command_timeout=0.4)
    started = time.monotonic()
    with pytest.raises(qga.QgaCommandTimeout) as info:
        connection.exec_command("sleep 1000")
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2.0
    assert "timed out" in info.value.message and "after 0.4 s" in info.value.message
    assert "process 1000 in the guest, where it may still be running" in info.value.message
    assert not isinstance(info.value, AnsibleConnectionFailure)
    assert set(server.commands()) == {"guest-sync-delimited", "guest-info", "guest-exec", "guest-exec-status"}


def test_put_file_writes_chunks_checks_each_count_and_the_final_size(
    connect: Connect, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qga, "CHUNK_SIZE", 1000)
    data = os.urandom(2500)
    (tmp_path / "src").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    guest = FakeGuest()
    connection, server = connect(guest)
    connection.put_file(str(tmp_path / "src"), "/tmp/dest")
    connection.put_file(str(tmp_path / "empty"), "/tmp/empty")
    assert guest.files == {"/tmp/dest": data, "/tmp/empty": b""}
    assert [h["writes"] for h in guest.handles.values()] == [3, 0]
    assert all(h["flushed"] and not h["open"] for h in guest.handles.values())
    assert server.commands().count("guest-file-seek") == 2


def test_a_short_write_fails_and_releases_the_handle(
    connect: Connect, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qga, "CHUNK_SIZE", 1000)
    (tmp_path / "src").write_bytes(os.urandom(2500))
    guest = FakeGuest()
    guest.short_write = True
    connection, dummy = connect(guest)
    with pytest.raises(AnsibleError, match="the agent wrote 500 of 1000 bytes at 1000"):
        connection.put_file(str(tmp_path / "src"), "/tmp/dest")
    assert [h["open"] for h in guest.handles.values()] == [False]


def test_put_of_a_missing_local_file_fails_before_the_guest_is_touched(
    connect: Connect, tmp_path: pathlib.Path
) -> None:
    guest = FakeGuest()
    connection, dummy = connect(guest)
    with pytest.raises(AnsibleError, match="file or module does not exist"):
        connection.put_file(str(tmp_path / "absent"), "/tmp/dest")
    assert guest.files == {}


def test_fetch_file_reads_chunks_until_eof_and_renames_into_place(
    connect: Connect, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qga, "CHUNK_SIZE", 1000)
    guest = FakeGuest()
    guest.files["/var/log/big"] = data = os.urandom(3000)
    guest.files["/var/log/empty"] = b""
    connection, server = connect(guest)
    connection.fetch_file("/var/log/big", str(tmp_path / "big"))
    connection.fetch_file("/var/log/empty", str(tmp_path / "empty"))
    assert (tmp_path / "big").read_bytes() == data
    assert (tmp_path / "empty").read_bytes() == b""
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "big").stat().st_mode & 0o777 == 0o666 & ~umask
    assert server.commands().count("guest-file-read") == 3 + 1  # the third read of big already says eof
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".sock")) == ["big", "empty"]
    assert not any(h["open"] for h in guest.handles.values())


@pytest.mark.parametrize("failure", ["missing-file", "wrong-count"])
def test_a_failed_fetch_leaves_no_file_behind(connect: Connect, tmp_path: pathlib.Path, failure: str) -> None:
    guest = FakeGuest()
    guest.files["/etc/motd"] = b"hello\n"
    guest.wrong_read_count = failure == "wrong-count"
    connection, dummy = connect(guest)
    source = "/etc/motd" if failure == "wrong-count" else "/etc/absent"
    with pytest.raises(AnsibleError) as info:
        connection.fetch_file(source, str(tmp_path / "out"))
    assert not isinstance(info.value, AnsibleConnectionFailure)  # the guest answered: a task failure
    assert f"Cannot read {source} from the guest" in info.value.message
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".sock")] == []
    assert not any(h["open"] for h in guest.handles.values())


def test_an_agent_that_does_not_answer_is_unreachable_within_the_connect_timeout(connect: Connect) -> None:
    connection, dummy = connect(FakeGuest(answer=False), connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(AnsibleConnectionFailure, match="did not answer within 0.5 s"):
        connection.exec_command("true")
    assert time.monotonic() - started < 2.0


def test_a_missing_socket_is_unreachable(connect: Connect, tmp_path: pathlib.Path) -> None:
    connection = connection_loader.get("vmsnap.qemu.qga", PlayContext())
    connection.set_options(direct={"socket": str(tmp_path / "none.sock")})
    with pytest.raises(AnsibleConnectionFailure, match="does not exist"):
        connection.exec_command("true")


def test_an_agent_lost_during_a_command_is_unreachable(connect: Connect) -> None:
    guest = FakeGuest()
    guest.hang_up_on = "guest-exec-status"
    connection, dummy = connect(guest)
    with pytest.raises(AnsibleConnectionFailure, match="Cannot follow guest process 1000: lost the guest agent"):
        connection.exec_command("true")
    assert not connection.connected  # the next operation connects again


def test_commands_the_agent_does_not_allow_are_named(connect: Connect, tmp_path: pathlib.Path) -> None:
    connection, server = connect(FakeGuest(enabled=qga.FILE_COMMANDS))
    with pytest.raises(AnsibleError, match="does not allow guest-exec, guest-exec-status"):
        connection.exec_command("true")
    assert "guest-exec" not in server.commands()


def test_become_is_refused_when_ansible_wrapped_the_command(connect: Connect) -> None:
    connection, dummy = connect(FakeGuest())
    become = become_loader.get("sudo")
    become.set_options(direct={"become_user": "nobody"})
    connection.set_become_plugin(become)
    wrapped = become.build_become_command("id -u", connection._shell)
    with pytest.raises(AnsibleError, match="does not support become"):
        connection.exec_command(wrapped)
    assert connection.exec_command("id -u") == (0, b"", b"")  # a command Ansible did not wrap runs as usual


def test_a_large_output_comes_back_whole(connect: Connect) -> None:
    guest = FakeGuest()
    out = os.urandom(16 * 1024 * 1024)
    guest.programs.append({"status": {"exitcode": 0, "out-data": b64(out), "out-truncated": False}})
    connection, dummy = connect(guest)
    started = time.monotonic()
    rc, stdout, stderr = connection.exec_command("cat big")
    assert (rc, stdout == out, stderr) == (0, True, b"")
    assert time.monotonic() - started < 10


# --- odd replies: a task failure naming the command and the field, never a traceback -----------------------------

ODD_STATUSES = {
    "not-an-object": (["exited"], "guest-exec-status with ['exited'] instead of an object"),
    "exitcode-string": ({"exited": True, "exitcode": "0"}, "exitcode = '0', not an integer"),
    "exitcode-null": ({"exited": True, "exitcode": None}, "exitcode = None, not an integer"),
    "exitcode-bool": ({"exited": True, "exitcode": True}, "exitcode = True, not an integer"),
    "signal-float": ({"exited": True, "signal": 9.5}, "signal = 9.5, not an integer"),
    "out-not-base64": ({"exited": True, "exitcode": 0, "out-data": "%%%"}, "out-data = '%%%', which is not base64"),
    "err-not-a-string": ({"exited": True, "exitcode": 0, "err-data": 12}, "err-data = 12, which is not base64"),
    "out-not-ascii": ({"exited": True, "exitcode": 0, "out-data": "ä"}, "out-data = 'ä', which is not base64"),
}


@pytest.mark.parametrize(("status", "expected"), list(ODD_STATUSES.values()), ids=list(ODD_STATUSES))
def test_an_odd_exec_status_is_a_task_failure(status: t.Any, expected: str) -> None:
    with pytest.raises(AnsibleError) as info:
        qga.decode_exec_status(status, 42)
    assert not isinstance(info.value, AnsibleConnectionFailure)
    assert info.value.message.startswith("Cannot read the result of guest process 42: qemu-guest-agent answered ")
    assert expected in info.value.message


class OddGuest(FakeGuest):
    """A FakeGuest whose reply to one command is replaced by `odd`."""

    def __init__(self, command: str, odd: t.Any) -> None:
        super().__init__()
        self.odd_command = command
        self.odd = odd

    def __call__(self, message: Message, server: FakeAgent) -> list[bytes] | None:
        if message["execute"] == self.odd_command:
            if self.odd_command in ("guest-file-read", "guest-file-write"):
                super().__call__(message, server)  # move the file position as the real agent would
            return [reply(message, self.odd)]
        return super().__call__(message, server)


@pytest.mark.parametrize(
    ("odd", "expected"),
    [
        ({}, "Cannot start the command: qemu-guest-agent answered guest-exec with pid = None, not an integer."),
        ({"pid": "12"}, "Cannot start the command: qemu-guest-agent answered guest-exec with pid = '12', not an"),
        (None, "Cannot start the command: qemu-guest-agent answered guest-exec with None instead of an object."),
    ],
)
def test_an_odd_guest_exec_reply_is_a_task_failure(connect: Connect, odd: t.Any, expected: str) -> None:
    connection, server = connect(OddGuest("guest-exec", odd))
    with pytest.raises(AnsibleError) as info:
        connection.exec_command("true")
    assert not isinstance(info.value, AnsibleConnectionFailure)
    assert info.value.message.startswith(expected)
    assert "guest-exec-status" not in server.commands()


def test_an_odd_status_while_polling_is_a_task_failure(connect: Connect) -> None:
    connection, dummy = connect(OddGuest("guest-exec-status", "running"))
    with pytest.raises(AnsibleError, match="Cannot follow guest process 1000: qemu-guest-agent answered "):
        connection.exec_command("true")


@pytest.mark.parametrize(
    ("odd", "expected"),
    [
        ({"count": "5", "buf-b64": b64(b"hello"), "eof": True}, "guest-file-read with count = '5', not an integer"),
        ({"count": 5, "buf-b64": "not base64!", "eof": True}, "guest-file-read with buf-b64 = 'not base64!', which"),
        ({"count": 5, "buf-b64": b64(b"hello"), "eof": "yes"}, "guest-file-read with eof = 'yes', not true or false"),
        ({"count": 5, "buf-b64": b64(b"hello")}, "guest-file-read with eof = None, not true or false"),
        ([1, 2], "guest-file-read with [1, 2] instead of an object"),
    ],
    ids=["count-string", "buf-not-base64", "eof-string", "eof-missing", "list"],
)
def test_an_odd_file_read_reply_fails_and_leaves_nothing_behind(
    connect: Connect, tmp_path: pathlib.Path, odd: t.Any, expected: str
) -> None:
    guest = OddGuest("guest-file-read", odd)
    guest.files["/etc/motd"] = b"hello"
    connection, dummy = connect(guest)
    with pytest.raises(AnsibleError) as info:
        connection.fetch_file("/etc/motd", str(tmp_path / "out"))
    assert not isinstance(info.value, AnsibleConnectionFailure)
    assert info.value.message.startswith("Cannot read /etc/motd from the guest: qemu-guest-agent answered ")
    assert expected in info.value.message
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".sock")] == []
    assert not any(h["open"] for h in guest.handles.values())


@pytest.mark.parametrize(
    ("command", "odd", "expected"),
    [
        ("guest-file-open", "500", "guest-file-open with handle = '500', not an integer"),
        ("guest-file-write", {"count": None}, "guest-file-write with count = None, not an integer"),
        ("guest-file-seek", {"position": "2"}, "guest-file-seek with position = '2', not an integer"),
    ],
)
def test_an_odd_file_write_reply_is_a_task_failure(
    connect: Connect, tmp_path: pathlib.Path, command: str, odd: t.Any, expected: str
) -> None:
    (tmp_path / "src").write_bytes(b"data")
    guest = OddGuest(command, odd)
    connection, dummy = connect(guest)
    with pytest.raises(AnsibleError) as info:
        connection.put_file(str(tmp_path / "src"), "/tmp/dest")
    assert not isinstance(info.value, AnsibleConnectionFailure)
    assert info.value.message.startswith("Cannot write /tmp/dest in the guest: qemu-guest-agent answered ")
    assert expected in info.value.message


def test_an_odd_guest_info_makes_the_host_unreachable(connect: Connect) -> None:
    connection, dummy = connect(OddGuest("guest-info", ["guest-exec"]))
    with pytest.raises(AnsibleConnectionFailure, match=r"answered guest-info with \['guest-exec'\] instead of an"):
        connection.exec_command("true")


def test_odd_supported_commands_count_as_not_allowed() -> None:
    assert qga.missing_commands({"supported_commands": "all"}, ["guest-exec"]) == ["guest-exec"]
    assert qga.missing_commands({"supported_commands": ["guest-exec", None]}, ["guest-exec"]) == ["guest-exec"]
