# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""execute_live() where real VMs rarely go: failed jobs and transactions, failed thaws, merges that stop half-way.

A real QmpClient talks to a fake QEMU (FakeVm) on a real Unix socket, served in a thread; plans come from plan_live()
over the VMs recorded in fixtures/qemu-7.2.22/live-*.json (see test_live.py). Overlay files are real files in tmp_path.
The happy paths against real QEMU are in the qmp_live_snapshot integration target and tests/vm.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import typing as t

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils import _live, _live_execute
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._guest_agent import (
    GuestAgentClient,
    GuestAgentError,
    GuestFreezer,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._live import (
    LivePlan,
    LiveRequest,
    LiveSnapshotError,
    plan_live,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._live_execute import LiveOutcome, execute_live
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient, QmpError, QmpJobError
from ansible_collections.vmsnap.qemu.tests.unit.plugins.module_utils.qmp_fakes import (
    FakeQmp,
    Handler,
    Message,
    Recording,
    event,
    qmp_error,
    reply,
)
from ansible_collections.vmsnap.qemu.tests.unit.plugins.module_utils.test_guest_agent import Agent, FakeAgent, Odd

AGENT = "/run/vms/web01.qga"  # only planned with, never connected to: the freezer is a fake

# --- a fake VM behind it ----------------------------------------------------------------------------------------

JOB_TYPES = {"snapshot-save": "snapshot-save", "snapshot-load": "snapshot-load", "block-commit": "commit"}


class FakeVm:
    """What QEMU answers for the commands execute_live sends, with its job life cycle.

    A job starts 'running'. Each query-jobs reports the jobs as they are, then moves every running job on - to
    'ready' for an active block-commit (top-node is the device's active node), else to 'concluded' with the
    error job_error() names - and sends JOB_STATUS_CHANGE after its reply, as QEMU would. job-complete and
    job-dismiss are refused in the wrong state, with QEMU's words. A block-commit that concludes closes the
    top image (its nodes go) unless keep_open. events_after["<command>"] / ["<command>:concluded"] are sent after
    that reply / when such a job concludes. hooks replace the answer to a command.
    """

    def __init__(self, nodes: list[Message] | None = None, status: str = "running", journal: list | None = None):
        self.nodes = [dict(node) for node in nodes or []]
        self.status = status
        self.journal = journal if journal is not None else []
        self.jobs: dict[str, dict[str, t.Any]] = {}
        self.job_error: t.Callable[[str, Message], t.Optional[str]] = lambda command, arguments: None
        self.status_after_failed_job: str | None = None
        self.keep_open = False
        self.top_existed_at_conclusion: list[bool] = []
        self.events_after: dict[str, list[Message]] = {}
        self.hooks: dict[str, Handler] = {}

    def __call__(self, message: Message, server: FakeQmp) -> list[Message] | None:
        command = message["execute"]
        self.journal.append(command)
        if command in self.hooks:
            out = self.hooks[command](message, server)
            if out is None:
                return None
        elif command in JOB_TYPES:
            out = self._start(message)
        elif command == "query-jobs":
            return self._query_jobs(message)
        elif command == "job-complete":
            return self._complete(message)
        elif command == "job-dismiss":
            out = self._dismiss(message)
        elif command == "query-status":
            out = [reply(message, {"status": self.status, "running": self.status == "running", "singlestep": False})]
        elif command == "query-named-block-nodes":
            out = [reply(message, [dict(node) for node in self.nodes])]
        elif command == "transaction":
            out = [reply(message, {})]
        else:
            desc = f"The command {command} has not been found"
            out = [{"error": {"class": "CommandNotFound", "desc": desc}, "id": message.get("id")}]
        return out + self.events_after.get(command, [])

    def _node(self, name: str) -> Message | None:
        return next((node for node in self.nodes if node["node-name"] == name), None)

    def _start(self, message: Message) -> list[Message]:
        command, args = message["execute"], message["arguments"]
        job: dict[str, t.Any] = {"command": command, "args": args, "active": False, "top_file": None}
        if command == "block-commit":
            for key in ("device", "top-node", "base-node"):
                if self._node(args[key]) is None:
                    return [qmp_error(message, f"Cannot find device='{args[key]}' nor node-name='{args[key]}'")]
            job["active"] = args["top-node"] == args["device"]
            job["top_file"] = t.cast(Message, self._node(args["top-node"]))["file"]
        job["error"] = self.job_error(command, args)
        job["info"] = {"id": args["job-id"], "type": JOB_TYPES[command], "status": "running"}
        self.jobs[args["job-id"]] = job
        return [reply(message, {}), event("JOB_STATUS_CHANGE", 1, 0, id=args["job-id"], status="running")]

    def _query_jobs(self, message: Message) -> list[Message]:
        out = [reply(message, [dict(job["info"]) for job in self.jobs.values()])]
        for job in list(self.jobs.values()):
            if job["info"]["status"] == "running":
                out += self._move(job, "ready" if job["active"] and not job["error"] else "concluded")
        return out

    def _move(self, job: dict[str, t.Any], status: str) -> list[Message]:
        job["info"]["status"] = status
        out: list[Message] = []
        if status == "concluded":
            if job["error"]:
                job["info"]["error"] = job["error"]
                if self.status_after_failed_job:
                    self.status = self.status_after_failed_job
            elif job["top_file"]:
                self.top_existed_at_conclusion.append(os.path.exists(job["top_file"]))
                if not self.keep_open:
                    self.nodes = [node for node in self.nodes if node["file"] != job["top_file"]]
            out += self.events_after.get(f"{job['command']}:concluded", [])
        return [*out, event("JOB_STATUS_CHANGE", 2, 0, id=job["info"]["id"], status=status)]

    def _refuse(self, message: Message, verb: str) -> list[Message] | None:
        job = self.jobs.get(message["arguments"]["id"])
        if job is None:
            return [qmp_error(message, f"Job ID '{message['arguments']['id']}' not found")]
        wanted = "ready" if verb == "complete" else "concluded"
        if job["info"]["status"] != wanted:
            desc = f"Job '{job['info']['id']}' in state '{job['info']['status']}' cannot accept command verb '{verb}'"
            return [qmp_error(message, desc)]
        return None

    def _complete(self, message: Message) -> list[Message]:
        refused = self._refuse(message, "complete")
        if refused:
            return refused
        return [reply(message, {}), *self._move(self.jobs[message["arguments"]["id"]], "concluded")]

    def _dismiss(self, message: Message) -> list[Message]:
        refused = self._refuse(message, "dismiss")
        if refused:
            return refused
        del self.jobs[message["arguments"]["id"]]
        return [reply(message, {})]


class FakeFreezer:
    """The guest agent's freeze and thaw, noted in the journal shared with the FakeVm."""

    def __init__(self, journal: list, filesystems: int = 2, freeze_error: str = "", thaw_error: str = "") -> None:
        self.journal = journal
        self.filesystems = filesystems
        self.freeze_error = freeze_error
        self.thaw_error = thaw_error

    def freeze(self) -> int:
        self.journal.append("freeze")
        if self.freeze_error:
            raise GuestAgentError(self.freeze_error)
        return self.filesystems

    def thaw(self) -> int:
        self.journal.append("thaw")
        if self.thaw_error:
            raise GuestAgentError(self.thaw_error)
        return self.filesystems


@pytest.fixture
def connect(tmp_path):
    """connect(vm) -> (server, client): a FakeQmp serving vm on a socket in tmp_path, and a connected QmpClient."""
    servers: list[FakeQmp] = []
    clients: list[QmpClient] = []

    def start(vm: FakeVm) -> tuple[FakeQmp, QmpClient]:
        server = FakeQmp(str(tmp_path / f"qmp{len(servers)}.sock"), vm)
        servers.append(server)
        client = QmpClient(server.path, connect_timeout=5.0, command_timeout=5.0)
        client.connect()
        clients.append(client)
        return server, client

    yield start
    for client in clients:
        client.close()
    for server in servers:
        server.close()


def plan(recording: Recording, name: str = "new", **kwargs: t.Any) -> LivePlan:
    kwargs.setdefault("timeout", 5.0)  # a test that breaks waits this long, not 300 s
    return plan_live(LiveRequest(name=name, **kwargs), recording.vm, recording.version, recording.nodes)


# Node names QEMU gave the layers in live-chain-two-overlays.json (format nodes; each file also has a "file" node).
CHAIN_NODES = {
    "a.vmsnap-e2.qcow2": "vmsnap-2acd1df4dd3bdb14b5d2",  # drive0's active node
    "a.vmsnap-e1.qcow2": "vmsnap-f86c5497fcae353e35a2",
    "a.qcow2": "#block289",
    "b.vmsnap-e2.qcow2": "vmsnap-ddf3da40630efc77f96c",  # vd2's active node
    "b.vmsnap-e1.qcow2": "vmsnap-b15aea3badf137936e89",
    "b.qcow2": "disk2",
}


@pytest.fixture
def chain(live, tmp_path) -> Recording:
    """live-chain-two-overlays in tmp_path, with a real file for every layer."""
    recording = live("chain-two-overlays", root=tmp_path)
    for name in CHAIN_NODES:
        (tmp_path / name).write_bytes(b"QFI\xfb layer " + name.encode())
    return recording


def unlink_fails_for(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """os.unlink(path) fails as for a user without write permission on the folder (QEMU made the file)."""
    real_unlink = os.unlink

    def unlink(target: t.Any, *args: t.Any, **kwargs: t.Any) -> None:
        if os.fspath(target) == path:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        real_unlink(target, *args, **kwargs)

    monkeypatch.setattr(_live_execute.os, "unlink", unlink)


# --- 1. snapshot-load that fails ------------------------------------------------------------------------------

LOAD_ERROR = "Error -22 while loading VM state"
NOT_RESUME = "do not simply resume it"


@pytest.mark.parametrize(
    "before, after, warned",
    [
        pytest.param("running", "restore-vm", True, id="left-in-restore-vm"),
        pytest.param("running", "running", False, id="resumed-by-qemu"),
        pytest.param("paused", "paused", False, id="was-paused-before"),  # QEMU keeps a paused VM 'paused'
    ],
)
def test_a_failed_snapshot_load_says_whether_qemu_left_the_vm_paused(
    connect, live, before: str, after: str, warned: bool
) -> None:
    recording = live("mixed-snapshots")
    recording.vm.update(status=before, running=before == "running")
    vm = FakeVm(recording.nodes, status=before)
    vm.job_error = lambda command, arguments: LOAD_ERROR if command == "snapshot-load" else None
    vm.status_after_failed_job = after
    server, qmp = connect(vm)
    live_plan = plan(recording, name="ckpt", state="reverted", devices=("drive0", "disk2"))
    with pytest.raises(QmpJobError) as info:
        execute_live(qmp, live_plan, None)
    message = info.value.msg
    assert LOAD_ERROR in message
    assert ("QEMU left the VM paused (status 'restore-vm')" in message) is warned
    assert (NOT_RESUME in message) is warned
    assert info.value.details["vm_status"] == after
    (load,) = server.sent("snapshot-load")
    assert load[1]["job-id"].startswith("vmsnap-load-")
    assert {key: value for key, value in load[1].items() if key != "job-id"} == {
        "tag": "ckpt",
        "vmstate": "#block288",  # drive0 holds the RAM state of ckpt
        "devices": ["#block288", "disk2"],
    }
    assert server.sent("job-dismiss") == [("job-dismiss", {"id": load[1]["job-id"]})]
    assert server.sent("query-status") == [("query-status", {})]  # asked after the failure


def test_a_failed_snapshot_load_when_the_status_cannot_be_read(connect, live) -> None:
    vm = FakeVm(status="running")
    vm.job_error = lambda command, arguments: LOAD_ERROR
    vm.hooks["query-status"] = lambda message, server: [qmp_error(message, "the monitor is busy")]
    server, qmp = connect(vm)
    live_plan = plan(live("mixed-snapshots"), name="ckpt", state="reverted", devices=("drive0", "disk2"))
    with pytest.raises(QmpJobError) as info:
        execute_live(qmp, live_plan, None)
    assert info.value.details["vm_status"] is None
    assert NOT_RESUME not in info.value.msg and LOAD_ERROR in info.value.msg


# --- 2. external present: the transaction fails ---------------------------------------------------------------


def _transaction_that_fails(created: int, desc: str) -> Handler:
    """QEMU creates the first `created` overlay files of the transaction, then gives up with desc."""

    def handler(message: Message, server: FakeQmp) -> list[Message]:
        for action in message["arguments"]["actions"][:created]:
            with open(action["data"]["snapshot-file"], "wb") as overlay:
                overlay.write(b"QFI\xfb made by QEMU")
        return [qmp_error(message, desc)]

    return handler


def test_a_failed_external_transaction_removes_the_overlays_qemu_created(connect, live, tmp_path) -> None:
    recording = live("mixed-fresh", root=tmp_path)
    (tmp_path / "disk0.qcow2").write_bytes(b"the disk itself")
    live_plan = plan(recording, mode="external")  # every writable disk: drive0, drive1 (raw), vd2
    overlays = [device.overlay for device in live_plan.devices]
    assert overlays == [
        f"{tmp_path}/disk0.vmsnap-new.qcow2",
        f"{tmp_path}/data.raw.vmsnap-new.qcow2",
        f"{tmp_path}/disk2.vmsnap-new.qcow2",
    ]
    desc = f"Could not create '{overlays[2]}': No space left on device"
    vm = FakeVm(recording.nodes)
    vm.hooks["transaction"] = _transaction_that_fails(created=2, desc=desc)
    server, qmp = connect(vm)
    with pytest.raises(LiveSnapshotError) as info:
        execute_live(qmp, live_plan, None)
    err = info.value
    assert err.details["removed_overlays"] == overlays  # all three were created by this task (claimed empty)
    assert not any(os.path.lexists(path) for path in overlays)
    assert (tmp_path / "disk0.qcow2").read_bytes() == b"the disk itself"
    assert f"QEMU refused the external snapshot: {desc}." in err.msg
    assert "so no disk got an overlay; the 3 overlay file(s) this task had created were removed" in err.msg
    ((command, arguments),) = server.sent("transaction")
    assert arguments["actions"] == [
        {
            "type": "blockdev-snapshot-sync",
            "data": {
                "node-name": node,
                "snapshot-file": overlay,
                "snapshot-node-name": _live.overlay_node_name(overlay),
                "format": "qcow2",
                "mode": "absolute-paths",
            },
        }
        for node, overlay in zip(["#block288", "#block608", "disk2"], overlays)
    ]


def test_a_failed_external_transaction_that_created_nothing(connect, live, tmp_path) -> None:
    recording = live("mixed-fresh", root=tmp_path)
    vm = FakeVm(recording.nodes)
    vm.hooks["transaction"] = _transaction_that_fails(created=0, desc="Permission denied")
    dummy, qmp = connect(vm)
    live_plan = plan(recording, mode="external", devices=("drive0", "disk2"))
    with pytest.raises(LiveSnapshotError, match="no disk got an overlay; the 2 overlay file\\(s\\)") as info:
        execute_live(qmp, live_plan, None)
    assert info.value.details["removed_overlays"] == [device.overlay for device in live_plan.devices]


def test_an_overlay_file_that_appears_after_planning_is_never_touched(connect, live, tmp_path) -> None:
    recording = live("mixed-fresh", root=tmp_path)
    live_plan = plan(recording, mode="external", devices=("drive0", "disk2"))
    first, second = (t.cast(str, device.overlay) for device in live_plan.devices)
    with open(second, "w") as other:  # another VM's task made it in the meantime
        other.write("someone else's overlay")
    server, qmp = connect(FakeVm(recording.nodes))
    with pytest.raises(LiveSnapshotError, match="it appeared after this task checked") as info:
        execute_live(qmp, live_plan, None)
    assert "No snapshot was taken" in info.value.msg
    assert info.value.details["removed_overlays"] == [first]  # this task's own claim, and only that
    assert not os.path.lexists(first)
    with open(second) as other:
        assert other.read() == "someone else's overlay"
    assert server.sent("transaction") == []


def test_an_overlay_left_by_a_failed_transaction_that_cannot_be_removed_is_reported(
    connect, live, tmp_path, monkeypatch
) -> None:
    recording = live("mixed-fresh", root=tmp_path)
    live_plan = plan(recording, mode="external", devices=("drive0", "disk2"))
    stuck, other = (t.cast(str, device.overlay) for device in live_plan.devices)
    vm = FakeVm(recording.nodes)
    vm.hooks["transaction"] = _transaction_that_fails(created=2, desc="Input/output error")
    dummy, qmp = connect(vm)
    unlink_fails_for(monkeypatch, stuck)
    with pytest.raises(VmsnapError) as info:
        execute_live(qmp, live_plan, None)
    assert "Input/output error" in info.value.msg and stuck in info.value.msg
    assert not os.path.lexists(other)


# --- 3. quiesce -----------------------------------------------------------------------------------------------


def _quiesced_plan(live: t.Callable[..., Recording]) -> LivePlan:
    """A disk-only internal snapshot (one QMP transaction) of drive0 and disk2, with quiesce."""
    live_plan = plan(
        live("mixed-fresh"), devices=("drive0", "disk2"), vmstate=False, quiesce="required", guest_agent_socket=AGENT
    )
    assert live_plan.quiesce
    return live_plan


def _slow_transaction(message: Message, server: FakeQmp) -> list[Message]:
    time.sleep(0.05)
    return [reply(message, {})]


def test_quiesce_freezes_around_the_snapshot_and_reports_it(connect, live) -> None:
    journal: list[str] = []
    vm = FakeVm(journal=journal)
    vm.hooks["transaction"] = _slow_transaction
    server, qmp = connect(vm)
    outcome = execute_live(qmp, _quiesced_plan(live), FakeFreezer(journal, filesystems=3))
    assert journal == ["freeze", "transaction", "thaw"]
    assert outcome.frozen is True and outcome.frozen_filesystems == 3
    assert outcome.frozen_ms is not None and outcome.frozen_ms >= 50
    assert outcome.elapsed_ms >= outcome.frozen_ms
    ((command, arguments),) = server.sent("transaction")
    assert arguments == {
        "actions": [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "#block288", "name": "new"}},
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "disk2", "name": "new"}},
        ]
    }


def test_without_quiesce_nothing_is_frozen(connect, live) -> None:
    journal: list[str] = []
    dummy, qmp = connect(FakeVm(journal=journal))
    live_plan = plan(live("mixed-fresh"), devices=("drive0",), vmstate=False)
    outcome = execute_live(qmp, live_plan, FakeFreezer(journal))
    assert journal == ["transaction"]
    assert (outcome.frozen, outcome.frozen_filesystems, outcome.frozen_ms) == (False, None, None)


SNAPSHOT_ERROR = "Snapshot with name 'new' already exists on device 'disk2'"
THAW_ERROR = "The guest agent could not thaw: guest-fsfreeze-thaw timed out"


@pytest.mark.parametrize("thaw_fails", [False, True])
def test_a_failed_snapshot_still_thaws_and_raises_its_own_error(connect, live, thaw_fails: bool) -> None:
    journal: list[str] = []
    vm = FakeVm(journal=journal)
    vm.hooks["transaction"] = lambda message, server: [qmp_error(message, SNAPSHOT_ERROR)]
    dummy, qmp = connect(vm)
    freezer = FakeFreezer(journal, thaw_error=THAW_ERROR if thaw_fails else "")
    with pytest.raises(QmpError) as info:
        execute_live(qmp, _quiesced_plan(live), freezer)
    assert journal == ["freeze", "transaction", "thaw"]
    assert info.value.command == "transaction" and info.value.desc == SNAPSHOT_ERROR
    assert info.value.msg.startswith(f"QMP transaction failed: {SNAPSHOT_ERROR}")
    assert ("Thawing the guest file systems failed as well: " + THAW_ERROR in info.value.msg) is thaw_fails
    assert "snapshot_taken" not in info.value.details


def test_a_failed_thaw_after_a_good_snapshot_says_the_snapshot_was_taken(connect, live) -> None:
    journal: list[str] = []
    dummy, qmp = connect(FakeVm(journal=journal))
    with pytest.raises(LiveSnapshotError) as info:
        execute_live(qmp, _quiesced_plan(live), FakeFreezer(journal, thaw_error=THAW_ERROR))
    assert journal == ["freeze", "transaction", "thaw"]
    assert info.value.details == {"snapshot_taken": True}
    assert info.value.msg.startswith(f"The snapshot was taken, but thawing the guest file systems failed: {THAW_ERROR}")
    assert "guest-fsfreeze-thaw" in info.value.msg


def test_an_odd_thaw_reply_after_a_good_snapshot_keeps_the_fact(connect, live, tmp_path) -> None:
    # The real GuestFreezer against a fake agent whose thaw answer is not a count: before, int() raised a
    # ValueError out of execute_live and the task lost the fact that the snapshot exists.
    journal: list[str] = []
    server, qmp = connect(FakeVm(journal=journal))
    agent_server = FakeAgent(str(tmp_path / "qga.sock"), Agent(thaw=Odd("thawed")))
    agent = GuestAgentClient(agent_server.path, 5.0, 5.0)
    try:
        agent.connect()
        with pytest.raises(LiveSnapshotError) as info:
            execute_live(qmp, _quiesced_plan(live), GuestFreezer(agent, 5.0))
    finally:
        agent.close()
        agent_server.close()
    assert journal == ["transaction"]
    assert agent_server.commands() == ["guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    assert info.value.details == {"snapshot_taken": True}
    assert info.value.msg == (
        "The snapshot was taken, but thawing the guest file systems failed: The guest agent answered "
        "guest-fsfreeze-thaw with 'thawed' instead of a number of file systems, so whether the guest's file systems "
        "are frozen is unknown. The guest may still be frozen; thaw it with guest-fsfreeze-thaw."
    )


def test_a_failed_freeze_takes_no_snapshot(connect, live) -> None:
    journal: list[str] = []
    dummy, qmp = connect(FakeVm(journal=journal))
    with pytest.raises(GuestAgentError, match="fs-freeze failed"):
        execute_live(qmp, _quiesced_plan(live), FakeFreezer(journal, freeze_error="fs-freeze failed"))
    assert journal == ["freeze"]


def test_a_failed_external_transaction_under_quiesce_removes_overlays_and_thaws(connect, live, tmp_path) -> None:
    recording = live("mixed-fresh", root=tmp_path)
    live_plan = plan(
        recording, mode="external", devices=("drive0", "disk2"), quiesce="required", guest_agent_socket=AGENT
    )
    journal: list[str] = []
    vm = FakeVm(recording.nodes, journal=journal)
    vm.hooks["transaction"] = _transaction_that_fails(created=1, desc="Permission denied")
    dummy, qmp = connect(vm)
    with pytest.raises(LiveSnapshotError) as info:
        execute_live(qmp, live_plan, FakeFreezer(journal))
    assert journal == ["freeze", "transaction", "thaw"]
    assert info.value.details["removed_overlays"] == [device.overlay for device in live_plan.devices]
    assert not any(os.path.lexists(t.cast(str, device.overlay)) for device in live_plan.devices)


def test_a_failed_clean_up_while_frozen_still_thaws_and_names_the_leftover(
    connect, live, tmp_path, monkeypatch
) -> None:
    recording = live("mixed-fresh", root=tmp_path)
    live_plan = plan(recording, mode="external", devices=("drive0",), quiesce="required", guest_agent_socket=AGENT)
    journal: list[str] = []
    vm = FakeVm(recording.nodes, journal=journal)
    vm.hooks["transaction"] = _transaction_that_fails(created=1, desc="Input/output error")
    dummy, qmp = connect(vm)
    overlay = t.cast(str, live_plan.devices[0].overlay)
    unlink_fails_for(monkeypatch, overlay)
    with pytest.raises(LiveSnapshotError) as info:
        execute_live(qmp, live_plan, FakeFreezer(journal))
    assert journal == ["freeze", "transaction", "thaw"]
    assert info.value.details == {"removed_overlays": [], "leftover_overlays": [f"{overlay} (Permission denied)"]}
    assert info.value.msg.startswith("QEMU refused the external snapshot: Input/output error.")
    assert f"These could not be removed; delete them by hand: {overlay} (Permission denied)." in info.value.msg
    assert os.path.exists(overlay)


def test_an_interrupt_while_frozen_still_thaws(connect, live, monkeypatch) -> None:
    # Not an error of the family (Ctrl-C, or a bug): the guest is thawed all the same and the interrupt goes on.
    journal: list[str] = []
    dummy, qmp = connect(FakeVm(journal=journal))

    def interrupted(*args: t.Any) -> None:
        journal.append("interrupted")
        raise KeyboardInterrupt

    monkeypatch.setattr(_live_execute, "_create", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute_live(qmp, _quiesced_plan(live), FakeFreezer(journal))
    assert journal == ["freeze", "interrupted", "thaw"]


# --- 4. external absent: merges -------------------------------------------------------------------------------


def _commits(server: FakeQmp) -> list[tuple[str, Message]]:
    """The job commands sent, job ids checked and left out."""
    out = []
    job_id = None
    for command, arguments in server.sent("block-commit", "job-complete", "job-dismiss"):
        arguments = dict(arguments)
        if command == "block-commit":
            job_id = arguments.pop("job-id")
            assert job_id.startswith("vmsnap-commit-")
        else:
            assert arguments.pop("id") == job_id
        out.append((command, arguments))
    return out


def _commit(device: str, top: str, base: str) -> tuple[str, Message]:
    args = {"device": CHAIN_NODES[device], "top-node": CHAIN_NODES[top], "base-node": CHAIN_NODES[base]}
    return ("block-commit", dict(args, **{"auto-dismiss": False}))


def test_merging_active_overlays_completes_each_commit_then_deletes_the_overlay(connect, chain, tmp_path) -> None:
    vm = FakeVm(chain.nodes)
    server, qmp = connect(vm)
    live_plan = plan(chain, name="e2", mode="external", state="absent")
    assert [(d.label, d.action, d.overlay_index) for d in live_plan.devices] == [
        ("drive0", "merge", 0),
        ("vd2", "merge", 0),
    ]
    outcome = execute_live(qmp, live_plan, None)
    assert _commits(server) == [
        _commit("a.vmsnap-e2.qcow2", "a.vmsnap-e2.qcow2", "a.vmsnap-e1.qcow2"),
        ("job-complete", {}),
        ("job-dismiss", {}),
        _commit("b.vmsnap-e2.qcow2", "b.vmsnap-e2.qcow2", "b.vmsnap-e1.qcow2"),
        ("job-complete", {}),
        ("job-dismiss", {}),
    ]
    assert vm.top_existed_at_conclusion == [True, True]  # deleted only after QEMU let go of it
    assert outcome.deleted_overlays == [f"{tmp_path}/a.vmsnap-e2.qcow2", f"{tmp_path}/b.vmsnap-e2.qcow2"]
    assert sorted(path.name for path in tmp_path.glob("*.qcow2")) == [
        "a.qcow2",
        "a.vmsnap-e1.qcow2",
        "b.qcow2",
        "b.vmsnap-e1.qcow2",
    ]
    assert vm.jobs == {}  # every job dismissed


def test_merging_an_intermediate_overlay_needs_no_job_complete(connect, chain, tmp_path) -> None:
    vm = FakeVm(chain.nodes)
    server, qmp = connect(vm)
    live_plan = plan(chain, name="e1", mode="external", state="absent", devices=("drive0",))
    outcome = execute_live(qmp, live_plan, None)
    assert _commits(server) == [
        _commit("a.vmsnap-e2.qcow2", "a.vmsnap-e1.qcow2", "a.qcow2"),
        ("job-dismiss", {}),
    ]
    assert outcome.deleted_overlays == [f"{tmp_path}/a.vmsnap-e1.qcow2"]
    assert not (tmp_path / "a.vmsnap-e1.qcow2").exists() and (tmp_path / "a.vmsnap-e2.qcow2").exists()


@pytest.mark.parametrize(
    "layer, candidates",
    [
        pytest.param("a.vmsnap-e1.qcow2", 2, id="top-opened-twice"),
        pytest.param("a.qcow2", 2, id="base-opened-twice"),
        pytest.param("a.qcow2", 0, id="base-not-open"),
    ],
)
def test_an_ambiguous_or_missing_node_merges_and_deletes_nothing(
    connect, chain, tmp_path, layer: str, candidates: int
) -> None:
    path = f"{tmp_path}/{layer}"
    nodes = [node for node in chain.nodes if not (candidates == 0 and node["file"] == path)]
    if candidates == 2:  # e.g. the same image also opened read-only by a blockdev-add for an export
        nodes.append({"backing_file_depth": 0, "drv": "qcow2", "file": path, "node-name": "export0", "ro": True})
    vm = FakeVm(nodes)
    server, qmp = connect(vm)
    live_plan = plan(chain, name="e1", mode="external", state="absent")
    with pytest.raises(LiveSnapshotError) as info:
        execute_live(qmp, live_plan, None)
    assert info.value.msg == (
        f"Cannot tell which QEMU block node is {path} ({candidates} candidates); nothing was merged."
    )
    assert info.value.details == {"image_path": path, "merged_on": [], "deleted_overlays": []}
    assert _commits(server) == []
    assert len(list(tmp_path.glob("*.qcow2"))) == len(CHAIN_NODES)


def test_a_merge_that_fails_on_the_second_disk_reports_the_first(connect, chain, tmp_path) -> None:
    vm = FakeVm(chain.nodes)
    second = CHAIN_NODES["b.vmsnap-e2.qcow2"]
    vm.job_error = lambda command, arguments: "No space left on device" if arguments["device"] == second else None
    server, qmp = connect(vm)
    live_plan = plan(chain, name="e2", mode="external", state="absent")
    with pytest.raises(QmpJobError, match="No space left on device") as info:
        execute_live(qmp, live_plan, None)
    assert info.value.details["merged_on"] == ["drive0"]
    assert info.value.details["deleted_overlays"] == [f"{tmp_path}/a.vmsnap-e2.qcow2"]
    assert not (tmp_path / "a.vmsnap-e2.qcow2").exists()
    assert (tmp_path / "b.vmsnap-e2.qcow2").exists()
    assert [command for command, dummy in _commits(server)] == [
        "block-commit",
        "job-complete",
        "job-dismiss",
        "block-commit",  # failed before it was ready: nothing to complete
        "job-dismiss",
    ]


def test_an_overlay_qemu_still_has_open_after_its_merge_is_not_deleted(connect, chain, tmp_path) -> None:
    vm = FakeVm(chain.nodes)
    vm.keep_open = True
    dummy, qmp = connect(vm)
    live_plan = plan(chain, name="e2", mode="external", state="absent")
    overlay = f"{tmp_path}/a.vmsnap-e2.qcow2"
    with pytest.raises(LiveSnapshotError, match="QEMU still has it open; it was not deleted") as info:
        execute_live(qmp, live_plan, None)
    assert info.value.msg.startswith(f"The overlay {overlay} was merged into its backing file")
    assert info.value.details == {"merged_on": ["drive0"], "deleted_overlays": []}
    assert os.path.exists(overlay)


def test_an_overlay_that_cannot_be_deleted_after_its_merge_is_reported(connect, chain, tmp_path, monkeypatch) -> None:
    dummy, qmp = connect(FakeVm(chain.nodes))
    overlay = f"{tmp_path}/a.vmsnap-e2.qcow2"
    unlink_fails_for(monkeypatch, overlay)
    with pytest.raises(VmsnapError) as info:
        execute_live(qmp, plan(chain, name="e2", mode="external", state="absent"), None)
    assert overlay in info.value.msg
    assert info.value.details["merged_on"][:1] == ["drive0"]


# --- 5. downtime ----------------------------------------------------------------------------------------------


def test_downtime_is_the_time_between_stop_and_resume_during_the_snapshot(connect, live) -> None:
    vm = FakeVm()
    # From an earlier pause, kept by the client before this task acts: not part of this snapshot's downtime.
    vm.hooks["query-status"] = lambda message, server: [
        event("STOP", 1795797600, 0),
        event("RESUME", 1795797605, 0),
        reply(message, {"status": "running", "running": True}),
    ]
    # Recorded timestamps of a real snapshot-save (live-mixed-snapshots.json): 52.774 ms apart.
    vm.events_after["snapshot-save"] = [event("STOP", 1795797686, 116429)]
    vm.events_after["snapshot-save:concluded"] = [event("RESUME", 1795797686, 169203)]
    server, qmp = connect(vm)
    qmp.execute("query-status")
    assert [e["event"] for e in qmp.events] == ["STOP", "RESUME"]
    live_plan = plan(live("mixed-fresh"), devices=("drive0", "disk2"))
    outcome = execute_live(qmp, live_plan, None)
    assert outcome.downtime_ms == 52.774
    assert isinstance(outcome, LiveOutcome) and outcome.elapsed_ms > 0
    assert not [e for e in qmp.events if e["event"] in ("STOP", "RESUME")]  # taken
    ((command, arguments),) = server.sent("snapshot-save")
    assert arguments["job-id"].startswith("vmsnap-save-")
    assert {key: value for key, value in arguments.items() if key != "job-id"} == {
        "tag": "new",
        "vmstate": "#block288",
        "devices": ["#block288", "disk2"],
    }
    assert vm.jobs == {}  # dismissed


def test_a_resume_that_comes_with_the_last_reply_is_counted(connect, live) -> None:
    vm = FakeVm()
    vm.events_after["snapshot-save"] = [event("STOP", 1795797686, 116429)]

    def dismiss_then_resume(message: Message, server: FakeQmp) -> list[Message]:
        # One write: the client reads the RESUME together with the reply, and nothing reads it after that.
        assert server.conn is not None
        del vm.jobs[message["arguments"]["id"]]
        lines = [reply(message, {}), event("RESUME", 1795797686, 136429)]
        server.conn.sendall(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        return []

    vm.hooks["job-dismiss"] = dismiss_then_resume
    dummy, qmp = connect(vm)
    outcome = execute_live(qmp, plan(live("mixed-fresh"), devices=("drive0",)), None)
    assert outcome.downtime_ms == 20.0


def test_a_guest_left_stopped_counts_until_now_and_is_flagged(connect, live) -> None:
    vm = FakeVm()
    stopped_at = time.time() - 3.0
    vm.events_after["snapshot-save"] = [event("STOP", int(stopped_at), int(stopped_at % 1 * 1e6))]
    dummy, qmp = connect(vm)
    started = time.monotonic()
    outcome = execute_live(qmp, plan(live("mixed-fresh"), devices=("drive0",)), None)
    waited = time.monotonic() - started
    assert outcome.left_paused is True
    assert 3000.0 <= outcome.downtime_ms <= (3.0 + waited + 1.0) * 1000
    assert waited >= 1.5  # it gave a late RESUME a chance first


def test_a_late_resume_is_waited_for(connect, live) -> None:
    vm = FakeVm()
    vm.events_after["snapshot-save"] = [event("STOP", 1795797686, 116429)]
    server, qmp = connect(vm)
    outcome_box: list[LiveOutcome] = []

    def run() -> None:
        outcome_box.append(execute_live(qmp, plan(live("mixed-fresh"), devices=("drive0",)), None))

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.5)
    assert server.conn is not None
    server.conn.sendall(json.dumps(event("RESUME", 1795797686, 216429)).encode() + b"\n")
    worker.join(10)
    assert outcome_box and outcome_box[0].downtime_ms == 100.0
    assert outcome_box[0].left_paused is False


def test_best_effort_goes_on_crash_consistent_when_the_freeze_fails(connect, live) -> None:
    live_plan = plan(
        live("mixed-fresh"), devices=("drive0", "disk2"), vmstate=False, quiesce="best_effort", guest_agent_socket=AGENT
    )
    journal: list[str] = []
    dummy, qmp = connect(FakeVm(journal=journal))
    outcome = execute_live(qmp, live_plan, FakeFreezer(journal, freeze_error="fsfreeze is not supported"))
    assert journal == ["freeze", "transaction"]  # snapshot taken, nothing to thaw
    assert outcome.frozen is False and outcome.frozen_ms is None
    assert outcome.warnings == [
        "quiesce=best_effort: the guest could not be frozen (fsfreeze is not supported); the snapshot is "
        "crash-consistent."
    ]


def test_required_fails_before_the_snapshot_when_the_freeze_fails(connect, live) -> None:
    journal: list[str] = []
    dummy, qmp = connect(FakeVm(journal=journal))
    with pytest.raises(GuestAgentError, match="fsfreeze is not supported"):
        execute_live(qmp, _quiesced_plan(live), FakeFreezer(journal, freeze_error="fsfreeze is not supported"))
    assert "transaction" not in journal


# --- external checkpoints with RAM: failures in the pause ------------------------------------------------------


def _ram_checkpoint_vm(recording: Recording, monkeypatch: pytest.MonkeyPatch) -> FakeVm:
    """A FakeVm that also answers what a RAM save asks; describe_vm() gives the recorded view."""
    monkeypatch.setattr(_live_execute, "describe_vm", lambda qmp: recording.vm)
    vm = FakeVm(recording.nodes)
    caps = [{"capability": "background-snapshot", "state": False}, {"capability": "events", "state": False}]
    answers = {
        "query-memory-size-summary": {"base-memory": 64 * 1024 * 1024},
        "qom-get": "pc-q35-7.2-machine",
        "query-migrate-capabilities": caps,
        "query-migrate-parameters": {"max-bandwidth": 134217728},
        "query-migrate": {},
    }
    for command, value in answers.items():
        vm.hooks[command] = lambda message, server, value=value: [reply(message, value)]
    for command in ("migrate-set-capabilities", "migrate-set-parameters", "getfd", "closefd", "migrate_cancel"):
        vm.hooks[command] = lambda message, server: [reply(message, {})]

    def set_status(status: str) -> Handler:
        def handler(message: Message, server: FakeQmp) -> list[Message]:
            vm.status = status
            return [reply(message, {}), event("STOP" if status == "paused" else "RESUME", 10, 0)]

        return handler

    vm.hooks["stop"] = set_status("paused")
    vm.hooks["cont"] = set_status("running")
    return vm


def _checkpoint_plan(recording: Recording, tmp_path: t.Any) -> LivePlan:
    live_plan = plan(recording, mode="external", vmstate=True, devices=("drive0", "disk2"), timeout=1.0)
    assert live_plan.state_file == f"{tmp_path}/disk0.vmsnap-new.vmstate"
    return live_plan


def test_a_checkpoint_whose_transaction_gets_no_answer_keeps_the_overlays(connect, live, tmp_path, monkeypatch) -> None:
    recording = live("mixed-fresh", root=tmp_path)
    vm = _ram_checkpoint_vm(recording, monkeypatch)
    vm.hooks["transaction"] = lambda message, server: []  # QEMU may have switched the disks: no answer
    server, qmp = connect(vm)
    live_plan = _checkpoint_plan(recording, tmp_path)
    with pytest.raises(VmsnapError) as info:
        execute_live(qmp, live_plan, None)
    overlays = [device.overlay for device in live_plan.devices]
    assert f"got no answer; the overlay files {', '.join(t.cast('list[str]', overlays))} were kept" in info.value.msg
    assert all(os.path.exists(path) for path in overlays)  # never deleted under a QEMU that may use them
    assert info.value.details["changed"] is True and info.value.details["leftover_overlays"] == overlays
    assert "migrate" not in server.commands() and server.commands()[-2:] == ["query-status", "cont"]
    assert "closefd" in server.commands()  # the descriptor QEMU never used is given back
    assert not [name for name in os.listdir(tmp_path) if ".vmsnap-tmp-" in name or name.endswith(".vmstate")]


def test_a_checkpoint_whose_transaction_is_refused_removes_the_overlays(connect, live, tmp_path, monkeypatch) -> None:
    recording = live("mixed-fresh", root=tmp_path)
    vm = _ram_checkpoint_vm(recording, monkeypatch)
    vm.hooks["transaction"] = _transaction_that_fails(created=1, desc="Permission denied")
    server, qmp = connect(vm)
    live_plan = _checkpoint_plan(recording, tmp_path)
    with pytest.raises(LiveSnapshotError, match="QEMU refused the external snapshot: Permission denied"):
        execute_live(qmp, live_plan, None)
    assert not any(os.path.lexists(device.overlay) for device in live_plan.devices)
    assert vm.status == "running" and "closefd" in server.commands() and "migrate" not in server.commands()


def test_a_checkpoint_whose_save_is_refused_keeps_its_overlays_and_cancels_nothing(
    connect, live, tmp_path, monkeypatch
) -> None:
    recording = live("mixed-fresh", root=tmp_path)
    vm = _ram_checkpoint_vm(recording, monkeypatch)
    vm.hooks["migrate"] = lambda message, server: [qmp_error(message, "There's a migration process in progress")]
    server, qmp = connect(vm)
    live_plan = _checkpoint_plan(recording, tmp_path)
    with pytest.raises(LiveSnapshotError, match="overlays of checkpoint 'new' were taken, but saving its RAM") as info:
        execute_live(qmp, live_plan, None)
    assert info.value.details["snapshot_taken"] is True
    assert all(os.path.exists(device.overlay) for device in live_plan.devices)
    assert "migrate_cancel" not in server.commands()  # the migration in progress is someone else's
    assert "closefd" in server.commands() and vm.status == "running"


# --- 8. state reverted with backup bitmaps (backup_bitmaps=drop) -----------------------------------------------

BACKUP_BITMAP = "vmsnap-backup-web01-0123abcd"
BITMAP_ERROR = "Could not load snapshot 'ckpt' on '#block288': Device has active dirty bitmaps"


def with_bitmaps(recording: Recording, names: t.Sequence[str], busy: bool = False) -> Recording:
    """drive0 of the recording with these dirty bitmaps (as query-block reports them)."""
    for disk in recording.vm["block_devices"]:
        if disk["device"] == "drive0":
            disk["bitmaps"] = [
                {"name": name, "busy": busy, "count": 0, "granularity": 65536, "persistent": True, "recording": True}
                for name in names
            ]
    return recording


def run_state_hooks(vm: FakeVm, remove_error: str = "") -> None:
    """stop and cont move the fake VM's status as QEMU does; block-dirty-bitmap-remove answers (or fails).

    The events come before the replies (QEMU sends them as it acts), so that none is left unread at the end.
    """

    def stop(message: Message, server: FakeQmp) -> list[Message]:
        vm.status = "paused"
        return [event("STOP", 3, 0), reply(message, {})]

    def cont(message: Message, server: FakeQmp) -> list[Message]:
        vm.status = "running"
        return [event("RESUME", 3, 500_000), reply(message, {})]

    def remove(message: Message, server: FakeQmp) -> list[Message]:
        return [qmp_error(message, remove_error)] if remove_error else [reply(message, {})]

    vm.hooks.update({"stop": stop, "cont": cont, "block-dirty-bitmap-remove": remove})


def revert_plan(recording: Recording, **kwargs: t.Any) -> LivePlan:
    return plan(recording, name="ckpt", state="reverted", devices=("drive0", "disk2"), **kwargs)


def test_drop_removes_the_backup_bitmaps_in_the_pause_of_the_load_and_resumes(connect, live) -> None:
    recording = with_bitmaps(live("mixed-snapshots"), [BACKUP_BITMAP, "vmsnap-backup-other-89abcdef"])
    vm = FakeVm(recording.nodes, status="running")
    run_state_hooks(vm)
    server, qmp = connect(vm)
    live_plan = revert_plan(recording, backup_bitmaps="drop")
    assert [b.backup_set for b in live_plan.devices[0].drop_bitmaps] == ["web01", "other"]
    outcome = execute_live(qmp, live_plan, None)
    acting = [c for c in vm.journal if c in ("stop", "block-dirty-bitmap-remove", "snapshot-load", "cont")]
    assert acting == ["stop", "block-dirty-bitmap-remove", "block-dirty-bitmap-remove", "snapshot-load", "cont"]
    assert [args for dummy, args in server.sent("block-dirty-bitmap-remove")] == [
        {"node": "#block288", "name": BACKUP_BITMAP},
        {"node": "#block288", "name": "vmsnap-backup-other-89abcdef"},
    ]
    assert vm.status == "running" and outcome.downtime_ms == 500.0 and not outcome.left_paused
    assert live_plan.devices[0].result()["dropped_bitmaps"] == [
        {"name": BACKUP_BITMAP, "set": "web01"},
        {"name": "vmsnap-backup-other-89abcdef", "set": "other"},
    ]


@pytest.mark.parametrize(
    "status, after, resumed",
    [
        pytest.param("paused", "unchanged", False, id="paused-stays-paused"),
        pytest.param("paused", "running", True, id="paused-resumed"),
        pytest.param("prelaunch", "running", True, id="prelaunch-like-loadvm"),
    ],
)
def test_a_vm_that_was_not_running_is_resumed_only_when_asked(connect, live, status, after, resumed) -> None:
    recording = with_bitmaps(live("mixed-snapshots"), [BACKUP_BITMAP])
    recording.vm.update(status=status, running=False)
    vm = FakeVm(recording.nodes, status=status)
    run_state_hooks(vm)
    server, qmp = connect(vm)
    execute_live(qmp, revert_plan(recording, backup_bitmaps="drop", after=after), None)
    assert "stop" not in vm.journal  # nothing runs that a pause would have to hold
    assert ("cont" in vm.journal) is resumed
    assert vm.journal.index("block-dirty-bitmap-remove") < vm.journal.index("snapshot-load")


def test_a_failed_bitmap_removal_resumes_the_guest_and_loads_nothing(connect, live) -> None:
    recording = with_bitmaps(live("mixed-snapshots"), [BACKUP_BITMAP, "vmsnap-backup-other-89abcdef"])
    vm = FakeVm(recording.nodes, status="running")
    run_state_hooks(vm)
    removals: list[str] = []

    def remove(message: Message, server: FakeQmp) -> list[Message]:
        removals.append(message["arguments"]["name"])
        if len(removals) == 2:
            return [qmp_error(message, "Bitmap 'vmsnap-backup-other-89abcdef' is currently in use")]
        return [reply(message, {})]

    vm.hooks["block-dirty-bitmap-remove"] = remove
    server, qmp = connect(vm)
    with pytest.raises(LiveSnapshotError) as info:
        execute_live(qmp, revert_plan(recording, backup_bitmaps="drop"), None)
    msg = info.value.msg
    assert "Removing the backup bitmap 'vmsnap-backup-other-89abcdef' from disk drive0 before the revert failed" in msg
    assert "The snapshot was not loaded. Already removed: " + BACKUP_BITMAP in msg
    assert "backup set 'web01' takes a full backup" in msg
    assert info.value.details["dropped_bitmaps"] == [{"device": "drive0", "name": BACKUP_BITMAP, "set": "web01"}]
    assert "snapshot-load" not in vm.journal and vm.journal[-1] == "cont" and vm.status == "running"


def test_a_failed_load_after_the_drop_names_the_dropped_bitmaps_and_keeps_the_vm_paused(connect, live) -> None:
    recording = with_bitmaps(live("mixed-snapshots"), [BACKUP_BITMAP])
    vm = FakeVm(recording.nodes, status="running")
    run_state_hooks(vm)
    vm.job_error = lambda command, arguments: LOAD_ERROR
    vm.status_after_failed_job = "restore-vm"
    server, qmp = connect(vm)
    with pytest.raises(QmpJobError) as info:
        execute_live(qmp, revert_plan(recording, backup_bitmaps="drop"), None)
    msg = info.value.msg
    assert LOAD_ERROR in msg and NOT_RESUME in msg
    assert f"The backup bitmaps {BACKUP_BITMAP} had been removed before the load" in msg
    assert info.value.details["dropped_bitmaps"] == [{"device": "drive0", "name": BACKUP_BITMAP, "set": "web01"}]
    assert "cont" not in vm.journal and vm.status == "restore-vm"


def test_a_bitmap_that_appears_after_the_plan_is_named_not_qemus_words(connect, live, monkeypatch) -> None:
    recording = live("mixed-snapshots")
    vm = FakeVm(recording.nodes, status="running")
    vm.job_error = lambda command, arguments: BITMAP_ERROR
    vm.status_after_failed_job = "restore-vm"
    server, qmp = connect(vm)
    live_plan = revert_plan(recording)  # no bitmaps yet: a backup adds one before the load
    later = with_bitmaps(live("mixed-snapshots"), [BACKUP_BITMAP, "other-tool"])
    monkeypatch.setattr(_live_execute, "describe_vm", lambda qmp: later.vm)
    with pytest.raises(QmpJobError) as info:
        execute_live(qmp, live_plan, None)
    msg = info.value.msg
    assert "Device has active dirty bitmaps" not in msg
    assert msg.startswith("Cannot revert to snapshot 'ckpt': QEMU refuses to revert an internal snapshot")
    assert (
        f"On disk drive0, bitmap '{BACKUP_BITMAP}' belongs to the backup set 'web01' of vmsnap.qemu.qcow2_backup; "
        "bitmap 'other-tool' belongs to another tool (not vmsnap.qemu)." in msg
    )
    assert "appeared after the task had checked the VM" in msg and NOT_RESUME in msg
    assert info.value.details["bitmaps"] == [BACKUP_BITMAP, "other-tool"]
