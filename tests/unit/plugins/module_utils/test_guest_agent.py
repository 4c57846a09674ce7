# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""GuestAgentClient and GuestFreezer against a fake qemu-guest-agent on a real Unix socket (served in a thread)."""

from __future__ import annotations

import json
import socket
import threading
import time
import typing as t

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils import _guest_agent
from ansible_collections.vmsnap.qemu.plugins.module_utils._guest_agent import (
    GuestAgentClient,
    GuestAgentError,
    GuestFreezer,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpConnectionError, QmpError, QmpTimeoutError

Message = t.Dict[str, t.Any]
# What the agent sends back for one command: raw bytes, sent in order; None drops the connection.
AgentHandler = t.Callable[[Message, "FakeAgent"], t.Optional[t.List[bytes]]]


def line(message: Message) -> bytes:
    return json.dumps(message).encode("utf-8") + b"\n"


def reply(message: Message, value: t.Any) -> bytes:
    """A reply as qemu-guest-agent's QMP dispatcher sends it: the request's id, when it had one, comes back."""
    out: Message = {"return": value}
    if "id" in message:
        out["id"] = message["id"]
    return line(out)


def error(message: Message, desc: str) -> bytes:
    out: Message = {"error": {"class": "GenericError", "desc": desc}}
    if "id" in message:
        out["id"] = message["id"]
    return line(out)


def sync_reply(message: Message) -> bytes:
    """guest-sync-delimited: a 0xFF byte, then the reply carrying the id the client chose."""
    return b"\xff" + line({"return": message["arguments"]["id"]})


class FakeAgent:
    """Serves one client like qemu-guest-agent: no greeting, JSON lines, and a 0xFF byte resets its parser.

    on_accept: bytes waiting in the channel before the client says anything (left over from an earlier client).
    half_read: what the agent had already read of an earlier client's unfinished command; the agent's parser
    goes on from there, as qemu-guest-agent's does, unless a 0xFF byte resets it.
    """

    def __init__(self, path: str, handler: AgentHandler, on_accept: bytes = b"", half_read: bytes = b"") -> None:
        self.path = path
        self.handler = handler
        self.on_accept = on_accept
        self.half_read = half_read
        self.received: list[Message] = []
        self.client_closed = threading.Event()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, dummy = self.server.accept()
        except OSError:
            return
        self.conn = conn
        if self.on_accept:
            conn.sendall(self.on_accept)
        buffer = self.half_read
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                self.client_closed.set()
                return
            buffer += chunk
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                raw = raw.rsplit(b"\xff", 1)[-1]
                if not raw.strip():
                    continue
                try:
                    message = json.loads(raw)
                except ValueError:
                    conn.sendall(line({"error": {"class": "GenericError", "desc": "JSON parse error"}}))
                    continue
                self.received.append(message)
                replies = self.handler(message, self)
                if replies is None:
                    conn.close()
                    return
                for data in replies:
                    conn.sendall(data)

    def commands(self) -> list[str]:
        return [str(message["execute"]) for message in self.received]

    def close(self) -> None:
        self.server.close()
        if self.conn is not None:
            self.conn.close()


class Odd:
    """An answer Agent sends as it is (a plain str would be an error description)."""

    def __init__(self, value: t.Any) -> None:
        self.value = value


class Agent:
    """A well-behaved agent: syncs, reports fsfreeze status, freezes and thaws (or fails as told)."""

    def __init__(
        self, status: str = "thawed", freeze: t.Any = 2, thaw: t.Any = 2, answer: t.Collection[str] | None = None
    ) -> None:
        self.status = status
        self.freeze = freeze  # an int is the count; a str is an error description
        self.thaw = thaw
        self.answer = answer  # None: answer everything; else only these commands

    def __call__(self, message: Message, server: FakeAgent) -> list[bytes] | None:
        command = message["execute"]
        if self.answer is not None and command not in self.answer:
            return []
        if command == "guest-sync-delimited":
            return [sync_reply(message)]
        if command == "guest-fsfreeze-status":
            return [reply(message, self.status)]
        if command in ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw"):
            outcome = self.freeze if command == "guest-fsfreeze-freeze" else self.thaw
            if isinstance(outcome, str):
                return [error(message, outcome)]
            if command == "guest-fsfreeze-freeze":
                self.status = "frozen"
            else:
                self.status = "thawed"
            return [reply(message, outcome.value if isinstance(outcome, Odd) else outcome)]
        return [error(message, f"The command {command} has not been found")]


Serve = t.Callable[..., FakeAgent]


@pytest.fixture
def serve(tmp_path: t.Any) -> t.Iterator[Serve]:
    servers: list[FakeAgent] = []

    def start(handler: AgentHandler, on_accept: bytes = b"", half_read: bytes = b"") -> FakeAgent:
        server = FakeAgent(str(tmp_path / f"qga{len(servers)}.sock"), handler, on_accept, half_read)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def connected(server: FakeAgent, connect_timeout: float = 5.0, command_timeout: float = 5.0) -> GuestAgentClient:
    agent = GuestAgentClient(server.path, connect_timeout, command_timeout)
    agent.connect()
    return agent


# --- sync ----------------------------------------------------------------------------------------------------

STALE = {
    "half-a-reply": b'{"return": {"frozen": [',
    "an-earlier-clients-reply": b'{"return": 3, "id": "vmsnap-7"}\n{"retu',
    "an-earlier-clients-sync": b'\xff{"return": 123456}\n{"return": 3, "id": "vmsnap-1"}\n',
    "binary-noise": b"\x00\x01garbage\n\x80\x81",
}


@pytest.mark.parametrize("stale", list(STALE.values()), ids=list(STALE))
@pytest.mark.parametrize("where", ["waiting-in-the-channel", "with-the-reply", "a-moment-before-the-reply"])
def test_sync_drops_stale_bytes_before_the_marker(serve: Serve, stale: bytes, where: str) -> None:
    agent_state = Agent()

    def handler(message: Message, server: FakeAgent) -> list[bytes] | None:
        replies = agent_state(message, server)
        if message["execute"] != "guest-sync-delimited" or where == "waiting-in-the-channel":
            return replies
        assert replies is not None and server.conn is not None
        if where == "with-the-reply":
            return [stale + replies[0]]  # one write: the noise and the reply arrive together
        server.conn.sendall(stale)  # the client reads the noise on its own first
        time.sleep(0.2)
        return replies

    server = serve(handler, on_accept=stale if where == "waiting-in-the-channel" else b"")
    agent = connected(server)
    try:
        assert agent.execute("guest-fsfreeze-status") == "thawed"
    finally:
        agent.close()
    assert server.commands() == ["guest-sync-delimited", "guest-fsfreeze-status"]


def test_the_leading_marker_resets_an_earlier_clients_half_sent_command(serve: Serve) -> None:
    server = serve(Agent(), half_read=b'{"execute": "guest-fsfreeze-fre')
    agent = connected(server, connect_timeout=1.0)
    try:
        assert agent.execute("guest-fsfreeze-status") == "thawed"
    finally:
        agent.close()
    assert server.commands() == ["guest-sync-delimited", "guest-fsfreeze-status"]


def test_a_late_sync_reply_is_skipped_and_the_next_attempt_wins(serve: Serve, monkeypatch: t.Any) -> None:
    monkeypatch.setattr(_guest_agent, "_SYNC_ATTEMPT_SECONDS", 0.2)
    syncs: list[int] = []

    def handler(message: Message, server: FakeAgent) -> list[bytes] | None:
        if message["execute"] == "guest-sync-delimited":
            syncs.append(message["arguments"]["id"])
            if len(syncs) == 1:
                time.sleep(0.5)  # the first attempt gives up before this reply comes
        return Agent()(message, server)

    server = serve(handler)
    agent = connected(server, connect_timeout=5.0)
    try:
        assert len(syncs) >= 2 and len(set(syncs)) == len(syncs)
        assert agent.execute("guest-fsfreeze-status") == "thawed"
    finally:
        agent.close()


def test_an_agent_that_never_answers_times_out_with_a_hint(serve: Serve) -> None:
    server = serve(lambda message, srv: [])  # QEMU's socket accepts even when no agent runs in the guest
    agent = GuestAgentClient(server.path, connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(QmpTimeoutError) as info:
        agent.connect()
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 2.0
    assert f"The guest agent at {server.path} did not answer within 0.5 s" in info.value.msg
    assert "Is qemu-guest-agent installed and running in the guest" in info.value.msg
    assert info.value.details["socket"] == server.path
    assert server.client_closed.wait(5), "the client did not close the socket after giving up"
    assert server.commands() == ["guest-sync-delimited"]


def test_an_agent_that_never_answers_is_asked_again_until_the_deadline(serve: Serve, monkeypatch: t.Any) -> None:
    monkeypatch.setattr(_guest_agent, "_SYNC_ATTEMPT_SECONDS", 0.2)
    server = serve(lambda message, srv: [])
    with pytest.raises(QmpTimeoutError, match="did not answer within 0.7 s"):
        GuestAgentClient(server.path, connect_timeout=0.7).connect()
    assert server.client_closed.wait(5)
    assert 3 <= server.commands().count("guest-sync-delimited") <= 5


def test_a_missing_agent_socket_is_named_as_such(tmp_path: t.Any) -> None:
    with pytest.raises(QmpConnectionError, match="guest agent socket .* does not exist"):
        GuestAgentClient(str(tmp_path / "qga.sock")).connect()


def test_an_agent_that_hangs_up_during_sync(serve: Serve) -> None:
    server = serve(lambda message, srv: None)
    with pytest.raises(QmpConnectionError, match="closed the connection"):
        GuestAgentClient(server.path, connect_timeout=2.0).connect()


# --- freezer -------------------------------------------------------------------------------------------------


def test_probe_accepts_a_thawed_guest(serve: Serve) -> None:
    server = serve(Agent(status="thawed"))
    agent = connected(server)
    try:
        GuestFreezer(agent, timeout=5).probe()
    finally:
        agent.close()
    assert server.commands() == ["guest-sync-delimited", "guest-fsfreeze-status"]


def test_probe_refuses_a_guest_someone_else_froze(serve: Serve) -> None:
    server = serve(Agent(status="frozen"))
    agent = connected(server)
    try:
        with pytest.raises(GuestAgentError, match="already frozen \\(someone else froze them\\)") as info:
            GuestFreezer(agent, timeout=5).probe()
    finally:
        agent.close()
    assert info.value.details["guest_fsfreeze_status"] == "frozen"
    assert "guest-fsfreeze-freeze" not in server.commands()
    assert "guest-fsfreeze-thaw" not in server.commands()


def test_probe_fails_when_the_agent_cannot_report_fsfreeze(serve: Serve) -> None:
    server = serve(Agent(answer=("guest-sync-delimited",)))
    agent = connected(server, command_timeout=0.3)
    try:
        with pytest.raises(QmpTimeoutError, match="reply to guest-fsfreeze-status"):
            GuestFreezer(agent, timeout=0.3).probe()
    finally:
        agent.close()


def test_freeze_returns_the_number_of_frozen_file_systems(serve: Serve) -> None:
    state = Agent(freeze=3)
    server = serve(state)
    agent = connected(server)
    try:
        assert GuestFreezer(agent, timeout=5).freeze() == 3
    finally:
        agent.close()
    assert server.commands() == ["guest-sync-delimited", "guest-fsfreeze-freeze"]
    assert state.status == "frozen"


def test_thaw_returns_the_number_of_thawed_file_systems(serve: Serve) -> None:
    state = Agent(freeze=2, thaw=2)
    server = serve(state)
    agent = connected(server)
    try:
        freezer = GuestFreezer(agent, timeout=5)
        assert freezer.freeze() == 2
        assert freezer.thaw() == 2
    finally:
        agent.close()
    assert server.commands() == ["guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    assert state.status == "thawed"


def test_a_failed_thaw_is_an_error(serve: Serve) -> None:
    server = serve(Agent(thaw="failed to thaw /: Device or resource busy"))
    agent = connected(server)
    try:
        with pytest.raises(QmpError, match="failed to thaw /"):
            GuestFreezer(agent, timeout=5).thaw()
    finally:
        agent.close()


@pytest.mark.parametrize("thaw", [1, "failed to thaw /: Invalid argument"])
def test_a_failed_freeze_is_thawed_and_reported(serve: Serve, thaw: t.Any) -> None:
    state = Agent(freeze="failed to freeze /var/lib/db: Device or resource busy", thaw=thaw)
    server = serve(state)
    agent = connected(server)
    try:
        with pytest.raises(GuestAgentError) as info:
            GuestFreezer(agent, timeout=5).freeze()
    finally:
        agent.close()
    assert info.value.msg.startswith("The guest agent could not freeze the file systems: ")
    assert "failed to freeze /var/lib/db: Device or resource busy" in info.value.msg
    if thaw == 1:
        assert "failed to thaw" not in info.value.msg
        assert "guest_may_be_frozen" not in info.value.details
    else:  # a guest that may still be frozen is never left unreported
        assert "Thawing afterwards failed too" in info.value.msg and "may still be frozen" in info.value.msg
        assert info.value.details["guest_may_be_frozen"] is True
    assert server.commands() == ["guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]


def test_a_freeze_that_never_answers_is_thawed_and_reported(serve: Serve) -> None:
    server = serve(Agent(answer=("guest-sync-delimited", "guest-fsfreeze-thaw")))
    agent = connected(server)
    started = time.monotonic()
    try:
        with pytest.raises(GuestAgentError, match="could not freeze the file systems: .*no answer"):
            GuestFreezer(agent, timeout=0.3).freeze()
    finally:
        agent.close()
    assert time.monotonic() - started < 3
    assert server.commands() == ["guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]


# --- odd replies -------------------------------------------------------------------------------------------------

ODD_COUNTS = ["2", None, True, -1, 2.0, {"count": 2}, [2]]


@pytest.mark.parametrize("odd", ODD_COUNTS, ids=[repr(v) for v in ODD_COUNTS])
def test_an_odd_freeze_reply_is_an_error_and_the_guest_is_thawed(serve: Serve, odd: t.Any) -> None:
    state = Agent(freeze=Odd(odd), thaw=2)
    server = serve(state)
    agent = connected(server)
    try:
        with pytest.raises(GuestAgentError) as info:
            GuestFreezer(agent, timeout=5).freeze()
    finally:
        agent.close()
    assert info.value.msg == (
        "The guest agent could not freeze the file systems: The guest agent answered guest-fsfreeze-freeze with "
        f"{odd!r} instead of a number of file systems, so whether the guest's file systems are frozen is unknown"
    )
    assert server.commands() == ["guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    assert state.status == "thawed"


@pytest.mark.parametrize("odd", ODD_COUNTS, ids=[repr(v) for v in ODD_COUNTS])
def test_an_odd_thaw_reply_is_an_error(serve: Serve, odd: t.Any) -> None:
    server = serve(Agent(thaw=Odd(odd)))
    agent = connected(server)
    try:
        with pytest.raises(GuestAgentError) as info:
            GuestFreezer(agent, timeout=5).thaw()
    finally:
        agent.close()
    assert "answered guest-fsfreeze-thaw with" in info.value.msg and "is unknown" in info.value.msg
    assert info.value.details == {"agent_reply": odd}


@pytest.mark.parametrize("odd", [None, 1, {"status": "thawed"}, "THAWED"])
def test_an_odd_freeze_status_refuses_to_freeze(serve: Serve, odd: t.Any) -> None:
    server = serve(Agent(status=odd))
    agent = connected(server)
    try:
        with pytest.raises(GuestAgentError) as info:
            GuestFreezer(agent, timeout=5).probe()
    finally:
        agent.close()
    assert info.value.msg == (
        f"The guest agent answered guest-fsfreeze-status with {odd!r}, not thawed or frozen; not freezing a guest "
        "whose state is unknown."
    )
    assert server.commands() == ["guest-sync-delimited", "guest-fsfreeze-status"]


def test_a_sync_reply_with_the_wrong_id_type_is_not_taken_for_the_answer(serve: Serve) -> None:
    def handler(message: Message, server: FakeAgent) -> list[bytes] | None:
        if message["execute"] == "guest-sync-delimited":
            return [b"\xff" + reply(message, str(message["arguments"]["id"]))]
        return []

    server = serve(handler)
    started = time.monotonic()
    with pytest.raises(QmpTimeoutError, match="did not answer within 0.5 s"):
        connected(server, connect_timeout=0.5)
    assert time.monotonic() - started < 3
