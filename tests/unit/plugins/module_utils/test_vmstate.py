# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""_vmstate: sidecars, the restore comparison, temporary files, and save_state's order of QMP commands.

save_state() talks to a fake QEMU on a real Unix socket (qmp_fakes.FakeQmp) that plays both behaviours of the
migration thread after a background snapshot's capture: QEMU 7.2 resumes the guest itself, later QEMU keeps a
paused guest paused. The real QEMU 7.2 behaviour is covered end to end in tests/vm/test_vm_state.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import typing as t
from dataclasses import replace
from pathlib import Path

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils import _vmstate
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import (
    InsufficientSpaceError,
    ValidationError,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient, QmpError
from ansible_collections.vmsnap.qemu.plugins.module_utils._vmstate import (
    QemuProcess,
    SaveRequest,
    Sidecar,
    StateDisk,
    StateFileError,
    VmFacts,
    VmStateError,
    already_restored_into,
    mismatches,
    read_sidecar,
    refuse_unrestorable,
    refuse_unsaveable,
    remove_stale_temp_files,
    reserve_bytes,
    save_state,
    sidecar_path,
    write_json_atomic,
)
from ansible_collections.vmsnap.qemu.tests.unit.plugins.module_utils.qmp_fakes import (
    FakeQmp,
    Message,
    event,
    qmp_error,
    reply,
)

SLOT0 = "/machine/peripheral-anon/device[0]/virtio-backend"
SLOT1 = "/machine/peripheral-anon/device[1]/virtio-backend"
DISKS = [
    StateDisk(SLOT0, None, "disk0", "/vms/a.qcow2", "qcow2"),
    StateDisk(SLOT1, None, "disk1", "/vms/b.qcow2", "qcow2"),
]
MIB = 1024 * 1024


def facts(**changes: t.Any) -> VmFacts:
    base = VmFacts(
        status="running",
        running=True,
        version=(7, 2, 22),
        machine="pc-q35-7.2-machine",
        ram_size=128 * MIB,
        disks=list(DISKS),
        process=QemuProcess(4242, 1000),
    )
    return replace(base, **changes)


def sidecar(**changes: t.Any) -> Sidecar:
    base = Sidecar(
        file="vm.vmstate",
        size=3,
        sha256="0" * 64,
        compression=None,
        live=True,
        time="2026-12-01T00:00:00+00:00",
        qemu_version="7.2.22",
        machine="pc-q35-7.2-machine",
        ram_size=128 * MIB,
        disks=list(DISKS),
    )
    return replace(base, **changes)


# --- comparing a sidecar with a waiting QEMU ----------------------------------------------------------------------


def test_a_matching_qemu_has_no_mismatches() -> None:
    assert mismatches(sidecar(), facts(status="inmigrate"), allow_other_version=False) == []


def test_every_mismatch_is_named() -> None:
    waiting = facts(
        version=(8, 2, 0),
        machine="pc-q35-8.2-machine",
        ram_size=256 * MIB,
        disks=[
            StateDisk(SLOT0, None, "disk0", "/vms/b.qcow2", "qcow2"),  # swapped into slot 0
            StateDisk("/machine/peripheral-anon/device[2]/virtio-backend", None, "disk2", "/vms/c.qcow2", "qcow2"),
        ],
    )
    problems = mismatches(sidecar(), waiting, allow_other_version=False)
    assert problems == [
        "QEMU version: saved by 7.2.22, the waiting QEMU is 8.2.0 (force=true accepts another version when the "
        "machine type is the same)",
        "machine type: saved pc-q35-7.2-machine, the waiting QEMU has pc-q35-8.2-machine",
        "RAM size: saved 134217728 bytes, the waiting QEMU has 268435456 bytes",
        f"disk {SLOT0}: saved with /vms/a.qcow2, the waiting QEMU has /vms/b.qcow2 there",
        f"disk {SLOT1} (/vms/b.qcow2) of the saved VM is missing in the waiting QEMU",
        "the waiting QEMU has a disk /machine/peripheral-anon/device[2]/virtio-backend (/vms/c.qcow2) that the "
        "saved VM did not have",
    ]
    assert not any("version" in p for p in mismatches(sidecar(), waiting, allow_other_version=True))


def test_a_disk_opened_with_another_format_is_a_mismatch() -> None:
    raw = facts(disks=[DISKS[0], replace(DISKS[1], format="raw")])
    assert mismatches(sidecar(), raw, False) == [f"disk {SLOT1}: saved as qcow2, the waiting QEMU opened it as raw"]


def test_refuse_unrestorable_checks_status_then_fit_then_the_file(tmp_path: t.Any) -> None:
    path = tmp_path / "vm.vmstate"
    path.write_bytes(b"abc")
    with pytest.raises(StateFileError, match="has no sidecar"):
        refuse_unrestorable(str(path), None, facts(status="inmigrate"), False)
    with pytest.raises(ValidationError, match="not waiting for an incoming state .status 'running'"):
        refuse_unrestorable(str(path), sidecar(), facts(), False)
    with pytest.raises(ValidationError, match="RAM size") as refused:
        refuse_unrestorable(str(path), sidecar(), facts(status="inmigrate", ram_size=MIB), False)
    assert refused.value.details["mismatches"] == [
        "RAM size: saved 134217728 bytes, the waiting QEMU has 1048576 bytes"
    ]
    with pytest.raises(StateFileError, match="is damaged or was replaced: it has 3 bytes with sha256 ba7816bf"):
        refuse_unrestorable(str(path), sidecar(), facts(status="inmigrate"), False)
    good = sidecar(sha256="ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    assert refuse_unrestorable(str(path), good, facts(status="inmigrate"), False) is good


def test_already_restored_into_needs_the_same_process_and_file() -> None:
    restored = sidecar(last_restore={"pid": 4242, "start_ticks": 1000, "sha256": "0" * 64})
    assert already_restored_into(restored, facts())
    assert not already_restored_into(restored, facts(process=QemuProcess(4242, 1001)))  # a reused pid
    assert not already_restored_into(replace(restored, sha256="1" * 64), facts())  # the file was replaced
    assert not already_restored_into(sidecar(), facts())
    assert not already_restored_into(None, facts())


# --- sidecars and files -------------------------------------------------------------------------------------------


def test_sidecar_round_trip_and_mode(tmp_path: t.Any) -> None:
    path = str(tmp_path / "vm.vmstate")
    written = sidecar(cmdline=["qemu-system-x86_64", "-m", "128"], with_overlays=[{"disk": "d", "overlay": "o"}])
    write_json_atomic(sidecar_path(path), written.as_dict())
    assert stat.S_IMODE(os.stat(sidecar_path(path)).st_mode) == 0o600
    assert read_sidecar(path) == written
    assert sorted(os.listdir(tmp_path)) == ["vm.vmstate.json"]  # no temporary file left
    assert read_sidecar(str(tmp_path / "other.vmstate")) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "is damaged: it is not JSON"),
        (b'{"format": 99}', "is not a vmsnap state sidecar"),
        (b"[1, 2]", "is not a vmsnap state sidecar"),
        (b'{"format": 1, "file": "x"}', "is damaged: KeyError"),
        (b'{"format": 1, "file": "x", "size": "many", "sha256": "", "live": true, "time": "", "qemu_version": "", '
         b'"ram_size": 1, "disks": []}', "is damaged: ValueError"),
    ],
)  # fmt: skip
def test_damaged_sidecars_are_reported(tmp_path: t.Any, content: bytes, message: str) -> None:
    path = tmp_path / "vm.vmstate"
    (tmp_path / "vm.vmstate.json").write_bytes(content)
    with pytest.raises(StateFileError, match=message):
        read_sidecar(str(path))


def test_stale_temp_files_of_dead_tasks_are_removed_and_others_kept(tmp_path: t.Any) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        f".vm.vmstate.vmsnap-tmp-{dead.pid}-1": False,
        f".vm.vmstate.vmsnap-tmp-{os.getpid()}-2": True,  # a task that still runs
        ".vm.vmstate.vmsnap-tmp-notapid": True,
        f".other.vmsnap-tmp-{dead.pid}-3": True,  # another state file's
        "vm.vmstate": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temp_files(str(tmp_path / "vm.vmstate"))
    assert removed == [str(tmp_path / f".vm.vmstate.vmsnap-tmp-{dead.pid}-1")]
    assert sorted(os.listdir(tmp_path)) == sorted(name for name, kept in names.items() if kept)


def test_a_killed_task_that_nobody_reaped_yet_counts_as_gone(tmp_path: t.Any) -> None:
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for: it stays a zombie
    deadline = time.monotonic() + 10
    while b") Z " not in Path(f"/proc/{zombie.pid}/stat").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (tmp_path / f".vm.vmstate.vmsnap-tmp-{zombie.pid}-1").write_bytes(b"x")
    try:
        assert remove_stale_temp_files(str(tmp_path / "vm.vmstate")) == [
            str(tmp_path / f".vm.vmstate.vmsnap-tmp-{zombie.pid}-1")
        ]
    finally:
        zombie.wait()


def test_reserve_covers_ram_and_a_margin() -> None:
    assert reserve_bytes(128 * MIB) == 512 * MIB  # video memory and ROMs do not shrink with the guest RAM
    assert reserve_bytes(8192 * MIB) == 8192 * MIB + 512 * MIB


@pytest.mark.parametrize(
    ("status", "message"),
    [
        ("prelaunch", "QEMU 7.2 aborts"),
        ("inmigrate", "restore one into it with state=restored"),
        ("postmigrate", "resume it with cont first"),
        ("guest-panicked", "the guest panicked"),
        ("suspended", "its state cannot be saved"),
    ],
)
def test_statuses_that_cannot_be_saved(status: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        refuse_unsaveable(facts(status=status, running=False), live=True)


def test_live_needs_qemu_6() -> None:
    with pytest.raises(ValidationError, match=r"QEMU 6.0 or later\); this VM runs QEMU 5.2.0. live=false works"):
        refuse_unsaveable(facts(version=(5, 2, 0)), live=True)
    refuse_unsaveable(facts(version=(5, 2, 0)), live=False)


# --- save_state against a fake QEMU -------------------------------------------------------------------------------


class FakeSaver:
    """QEMU's answers for a save. resumes_itself: the migration thread resumes the guest (7.2) or not (later)."""

    def __init__(self, resumes_itself: bool = True, outcome: str = "completed", polls_until_done: int = 2) -> None:
        self.resumes_itself = resumes_itself
        self.outcome = outcome
        self.polls_until_done = polls_until_done
        self.running = True
        self.migrating = False
        self.ended: str | None = None  # completed | failed | cancelled, once query-migrate said so
        self.polls = 0
        self.capabilities = {"background-snapshot": False, "events": False, "xbzrle": False}
        self.bandwidth = 134217728
        self.clock = 0

    def _tick(self) -> tuple[int, int]:
        self.clock += 7_000
        return 100 + self.clock // 1_000_000, self.clock % 1_000_000

    def __call__(self, message: Message, server: FakeQmp) -> list[Message]:
        command, args = message["execute"], message.get("arguments", {})
        if command == "query-migrate-capabilities":
            return [reply(message, [{"capability": k, "state": v} for k, v in self.capabilities.items()])]
        if command == "migrate-set-capabilities":
            if self.migrating and self.ended is None:  # as QEMU: not while a migration runs
                return [qmp_error(message, "There's a migration process in progress")]
            for cap in args["capabilities"]:
                self.capabilities[cap["capability"]] = cap["state"]
            return [reply(message, {})]
        if command == "query-migrate-parameters":
            return [reply(message, {"max-bandwidth": self.bandwidth, "downtime-limit": 300})]
        if command == "migrate-set-parameters":
            self.bandwidth = args["max-bandwidth"]
            return [reply(message, {})]
        if command == "query-status":
            return [reply(message, {"status": "running" if self.running else "paused", "running": self.running})]
        if command == "stop":
            self.running = False
            return [reply(message, {}), event("STOP", *self._tick())]
        if command == "cont":
            self.running = True
            return [reply(message, {}), event("RESUME", *self._tick())]
        if command == "migrate":
            self.migrating = True
            messages = [reply(message, {})]
            if self.resumes_itself:
                self.running = True
                messages.append(event("RESUME", *self._tick()))
            return messages
        if command == "query-migrate":
            return [reply(message, self._migration())]
        if command == "migrate_cancel":
            self.outcome, self.polls = "cancelled", self.polls_until_done
            return [reply(message, {})]
        if command in ("getfd", "closefd", "transaction", "quit"):
            return [reply(message, {})]
        return [qmp_error(message, f"unexpected {command}")]

    def _migration(self) -> dict[str, t.Any]:
        if not self.migrating:
            return {}
        self.polls += 1
        if self.polls > self.polls_until_done and self.outcome != "active":
            self.ended = self.outcome
            done: dict[str, t.Any] = {"status": self.outcome}
            if self.outcome == "failed":
                done["error-desc"] = "Unable to write to file: No space left on device"
            return done
        return {"status": "active", "ram": {"total": 128 * MIB, "remaining": 100 * MIB}}


@pytest.fixture
def states(tmp_path: t.Any) -> t.Any:
    """The folder for state files (tmp_path also holds the fake QEMU's socket)."""
    folder = tmp_path / "states"
    folder.mkdir()
    return folder


def saving(serve: t.Any, saver: FakeSaver) -> tuple[FakeQmp, QmpClient]:
    server = serve(saver)
    qmp = QmpClient(server.path, connect_timeout=2, command_timeout=5)
    qmp.connect()
    return server, qmp


def commands(server: FakeQmp) -> list[str]:
    return [name for name in server.commands() if not name.startswith("query-") and name != "qmp_capabilities"]


def test_qemu_7_2_resumes_the_guest_itself_so_no_cont_is_sent(serve: t.Any, states: t.Any) -> None:
    saver = FakeSaver(resumes_itself=True)
    server, qmp = saving(serve, saver)
    path = str(states / "vm.vmstate")
    order: list[str] = []

    def in_the_pause() -> list[dict[str, str]]:
        order.append(f"transaction while running={saver.running}")
        return [{"disk": "disk0", "overlay": "/vms/a.vmsnap-x.qcow2", "base": "/vms/a.qcow2"}]

    outcome = save_state(qmp, facts(), SaveRequest(path=path, timeout=5), while_paused=in_the_pause)
    assert order == ["transaction while running=False"]
    assert commands(server) == [
        "migrate-set-capabilities",
        "migrate-set-parameters",
        "getfd",
        "object-add",  # the pause marker: a killed task's pause is recognised by the next run
        "stop",
        "migrate",
        "migrate-set-capabilities",
        "migrate-set-parameters",
    ]
    assert saver.capabilities["background-snapshot"] is False and saver.bandwidth == 134217728
    assert outcome.downtime_ms == 7.0  # STOP and RESUME are one fake tick apart
    assert not outcome.left_paused and outcome.vm_status == "running"
    written = read_sidecar(path)
    assert written == outcome.sidecar and written is not None
    assert written.with_overlays == [{"disk": "disk0", "overlay": "/vms/a.vmsnap-x.qcow2", "base": "/vms/a.qcow2"}]
    assert written.disks == DISKS and written.live is True
    assert sorted(os.listdir(states)) == ["vm.vmstate", "vm.vmstate.json"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_later_qemu_keeps_the_guest_paused_so_it_is_resumed_once_ram_flows(serve: t.Any, states: t.Any) -> None:
    saver = FakeSaver(resumes_itself=False)
    server, qmp = saving(serve, saver)
    outcome = save_state(qmp, facts(), SaveRequest(path=str(states / "vm.vmstate"), timeout=5))
    assert commands(server)[3:7] == ["object-add", "stop", "migrate", "cont"]
    assert server.commands().index("cont") > server.commands().index("query-migrate")
    assert outcome.downtime_ms == 7.0 and outcome.vm_status == "running"


def test_a_paused_vm_is_not_stopped_and_stays_paused(serve: t.Any, states: t.Any) -> None:
    saver = FakeSaver(resumes_itself=False)
    saver.running = False
    server, qmp = saving(serve, saver)
    outcome = save_state(
        qmp, facts(status="paused", running=False), SaveRequest(path=str(states / "s"), after="paused", timeout=5)
    )
    assert "stop" not in server.commands() and "cont" not in server.commands()
    assert outcome.vm_status == "paused"


def test_a_failed_save_keeps_nothing_and_resumes_the_guest(serve: t.Any, states: t.Any) -> None:
    saver = FakeSaver(resumes_itself=False, outcome="failed", polls_until_done=0)  # fails before the capture
    server, qmp = saving(serve, saver)
    with pytest.raises(VmStateError, match="Unable to write to file: No space left on device. Nothing was kept") as err:
        save_state(qmp, facts(), SaveRequest(path=str(states / "vm.vmstate"), timeout=5))
    assert err.value.details["changed"] is True
    assert os.listdir(states) == []
    assert saver.running and saver.capabilities["background-snapshot"] is False and saver.bandwidth == 134217728
    after_migrate = server.commands()[server.commands().index("migrate") :]
    assert after_migrate[-1] == "cont" and "migrate_cancel" not in after_migrate  # it had ended: nothing to cancel


def test_a_save_that_outlives_its_timeout_is_cancelled_and_never_reported_done(serve: t.Any, states: t.Any) -> None:
    saver = FakeSaver(resumes_itself=True, outcome="active")
    server, qmp = saving(serve, saver)
    with pytest.raises(VmStateError, match="did not finish within 0.3 s .migration active.; it was cancelled"):
        save_state(qmp, facts(), SaveRequest(path=str(states / "vm.vmstate"), timeout=0.3))
    assert "migrate_cancel" in server.commands()
    assert not any(name.startswith("vm.vmstate") or ".vmsnap-tmp-" in name for name in os.listdir(states))
    # The settings go back only once the cancelled save has ended (QEMU refuses them before).
    assert saver.capabilities["background-snapshot"] is False and saver.bandwidth == 134217728


def test_no_space_is_refused_before_qemu_is_touched(serve: t.Any, states: t.Any, monkeypatch: t.Any) -> None:
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_vmstate.os, "posix_fallocate", no_space)
    saver = FakeSaver()
    server, qmp = saving(serve, saver)
    with pytest.raises(InsufficientSpaceError, match="it needs up to 536870912 bytes") as err:
        save_state(qmp, facts(), SaveRequest(path=str(states / "vm.vmstate"), timeout=5))
    assert err.value.details["needed_bytes"] == 512 * MIB
    assert commands(server) == []
    assert not any(".vmsnap-tmp-" in name or name.startswith("vm.") for name in os.listdir(states))


def test_capabilities_that_rule_out_a_background_snapshot_are_refused(serve: t.Any, states: t.Any) -> None:
    saver = FakeSaver()
    saver.capabilities["xbzrle"] = True
    server, qmp = saving(serve, saver)
    with pytest.raises(ValidationError, match="a state file must not be saved with: xbzrle"):
        save_state(qmp, facts(), SaveRequest(path=str(states / "vm.vmstate"), timeout=5))
    assert "stop" not in server.commands() and "migrate" not in server.commands()


def test_background_snapshot_left_on_by_a_killed_task_is_switched_off_for_a_plain_save(
    serve: t.Any, states: t.Any
) -> None:
    saver = FakeSaver(resumes_itself=False)
    saver.capabilities["background-snapshot"] = True
    server, qmp = saving(serve, saver)
    save_state(qmp, facts(), SaveRequest(path=str(states / "vm.vmstate"), live=False, timeout=5))
    sets = [args for name, args in server.sent("migrate-set-capabilities")]
    assert sets == [{"capabilities": [{"capability": "background-snapshot", "state": False}]}]
    assert server.commands().index("migrate-set-capabilities") < server.commands().index("migrate")
    assert json.loads(json.dumps(saver.capabilities))["background-snapshot"] is False


def test_a_refused_save_cancels_nothing_and_gives_the_descriptor_back(serve: t.Any, states: t.Any) -> None:
    saver = FakeSaver()

    def refuse_migrate(message: Message, server: FakeQmp) -> list[Message]:
        if message["execute"] == "migrate":
            return [qmp_error(message, "There's a migration process in progress")]
        return saver(message, server)

    server, qmp = saving(serve, refuse_migrate)  # type: ignore[arg-type]
    with pytest.raises(QmpError, match="migration process in progress") as err:
        save_state(qmp, facts(), SaveRequest(path=str(states / "vm.vmstate"), timeout=5))
    assert err.value.details["changed"] is True  # stopped and resumed
    assert "migrate_cancel" not in server.commands()  # the migration in progress is not this task's
    assert server.sent("closefd") == [("closefd", {"fdname": f"vmsnap-state-{os.getpid()}"})]
    assert saver.running and os.listdir(states) == []
