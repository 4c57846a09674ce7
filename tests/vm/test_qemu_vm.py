# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""vmsnap.qemu.qemu_vm against real QEMU under TCG (VMs without a guest OS), through ansible.

Starts with an argv (daemonizing and in the foreground), incoming + a RAM state round trip with qmp_vm_state,
-loadvm through extra_args, a QEMU killed with SIGKILL (stale socket file), failing starts, timeouts, and the unit
path. systemd does not run on this machine (PID 1 is not systemd): the unit path is tested with a stand-in
systemctl (fake_systemctl.py) placed first on PATH, not with real systemd.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest
from conftest import REPO, run_module

sys.path.insert(0, os.environ.get("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src")).split(os.pathsep)[0])
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient  # noqa: E402

VM = "vmsnap.qemu.qemu_vm"
STATE = "vmsnap.qemu.qmp_vm_state"
HERE = Path(__file__).resolve().parent


def qemu_argv(sock: Path, disk: Path, daemonize: bool) -> list[str]:
    argv = ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-display", "none", "-nodefaults", "-m", "64"]
    argv += ["-qmp", f"unix:{sock},server=on,wait=off"]
    argv += ["-drive", f"file={disk},format=qcow2,if=virtio,id=drive0,node-name=disk0"]
    return argv + (["-daemonize"] if daemonize else [])


def cmdline(pid: int) -> list[str]:
    return [arg.decode() for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"pid {pid} did not end"
        time.sleep(0.05)


def answers(sock: Path) -> tuple[str, int | None] | None:
    """(status, pid) of the QEMU behind sock, or None."""
    try:
        with QmpClient(str(sock), 2.0, 5.0) as qmp:
            return str(qmp.execute("query-status")["status"]), qmp.peer_pid()
    except Exception:  # noqa: BLE001 - anything means: nobody answers
        return None


class Vm:
    """One test VM: its folder, disk and socket; kills by pid, at the end, any QEMU of its own still running."""

    def __init__(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.sock = work / "vm.qmp"
        self.disk = work / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.disk), "16M"], check=True, timeout=60)
        self.pids: set[int] = set()

    def argv(self, daemonize: bool = True) -> list[str]:
        return qemu_argv(self.sock, self.disk, daemonize)

    def run(self, state: str, check: bool = False, **args: t.Any) -> dict[str, t.Any]:
        result = run_module(VM, check=check, diff=True, socket=str(self.sock), state=state, **args)
        if result.get("pid"):
            self.pids.add(int(result["pid"]))
        return result

    def four_runs(self, state: str, **args: t.Any) -> list[dict[str, t.Any]]:
        """check, real, repeat, repeat in check mode: changed, changed, unchanged, unchanged."""
        runs = []
        for check in (True, False, False, True):
            result = self.run(state, check=check, **args)
            assert not result["failed"], result
            runs.append(result)
        assert [run["changed"] for run in runs] == [True, True, False, False], runs
        return runs

    def cleanup(self) -> None:
        found = answers(self.sock)
        if found and found[1]:
            self.pids.add(found[1])
        for pid in self.pids:
            # Only our own QEMU: its command line names this test's folder.
            if not gone(pid) and any(str(self.work) in arg for arg in cmdline(pid)):
                os.kill(pid, signal.SIGKILL)
                wait_gone(pid)


@pytest.fixture
def vm(tmp_path: Path) -> t.Iterator[Vm]:
    machine = Vm(tmp_path / "vm")
    try:
        yield machine
    finally:
        machine.cleanup()


def test_started_and_stopped_with_a_daemonizing_argv(vm: Vm) -> None:
    argv = vm.argv(daemonize=True)
    check, real, again, again_check = vm.four_runs("started", start_argv=argv)
    assert answers(vm.sock) is not None and again["pid"] == real["pid"]
    assert check["previous_status"] == "stopped" and check["pid"] is None
    assert check["started_with"] == {"argv": [shutil.which("qemu-system-x86_64"), *argv[1:]]}
    assert real["started_with"] == check["started_with"] and real["status"] == "running"
    assert cmdline(real["pid"])[-1] == "-daemonize"
    assert again["previous_status"] == "running" and again["started_with"] is None
    assert again_check["status"] == "running"
    assert '-    "status": "stopped"\n+    "status": "running"' in check["_stdout"]  # the diff
    pid = real["pid"]

    check, real, again, again_check = vm.four_runs("stopped", start_argv=argv)
    assert check["pid"] == pid and check["previous_status"] == "running" and check["status"] == "running"
    assert real["pid"] == pid and real["status"] == "stopped" and real["killed"] is False
    assert gone(pid) and answers(vm.sock) is None
    assert again["previous_status"] == "stopped" and again["pid"] is None and again_check["status"] == "stopped"
    assert '-    "status": "running"\n+    "status": "stopped"' in check["_stdout"]


def test_incoming_with_a_foreground_argv_and_a_state_round_trip(vm: Vm, tmp_path: Path) -> None:
    argv = vm.argv(daemonize=False)
    started = vm.run("started", start_argv=argv)
    assert not started["failed"] and started["status"] == "running", started
    state_file = tmp_path / "vm.vmstate"
    saved = run_module(STATE, socket=str(vm.sock), path=str(state_file), after="quit")
    assert not saved["failed"], saved
    wait_gone(started["pid"])

    check, real, again, dummy = vm.four_runs("incoming", start_argv=argv)
    assert check["started_with"] == {"argv": [shutil.which(argv[0]), *argv[1:], "-incoming", "defer"]}
    assert real["status"] == "inmigrate" and again["status"] == "inmigrate" and again["pid"] == real["pid"]
    assert cmdline(real["pid"])[-2:] == ["-incoming", "defer"] and "-daemonize" not in cmdline(real["pid"])
    # A waiting QEMU answers: started leaves it alone.
    assert not vm.run("started", start_argv=argv)["changed"]

    restored = run_module(STATE, socket=str(vm.sock), path=str(state_file), state="restored")
    assert not restored["failed"] and restored["vm_status"] == "running", restored

    refused = vm.run("incoming", start_argv=argv)
    assert refused["failed"] and not refused["changed"]
    assert "is running with status running, so it cannot wait for an incoming state; stop it first" in refused["msg"]
    assert answers(vm.sock) == ("running", real["pid"])  # untouched

    stopped = vm.run("stopped")
    assert stopped["changed"] and gone(real["pid"]), stopped


def test_loadvm_through_extra_args(vm: Vm) -> None:
    argv = vm.argv()
    started = vm.run("started", start_argv=argv)
    assert not started["failed"], started
    with QmpClient(str(vm.sock), 5.0, 60.0) as qmp:
        qmp.run_job(
            "snapshot-save",
            {"job-id": "save", "tag": "pre-upgrade", "vmstate": "disk0", "devices": ["disk0"]},
            timeout=60,
        )
    assert vm.run("stopped")["changed"]

    loaded = vm.run("started", start_argv=argv, extra_args=["-loadvm", "pre-upgrade"])
    assert not loaded["failed"] and loaded["changed"] and loaded["status"] == "running", loaded
    assert cmdline(loaded["pid"])[-3:] == ["-daemonize", "-loadvm", "pre-upgrade"]
    assert loaded["started_with"]["argv"][-2:] == ["-loadvm", "pre-upgrade"]


def test_a_qemu_killed_with_sigkill_leaves_a_stale_socket(vm: Vm) -> None:
    argv = vm.argv()
    first = vm.run("started", start_argv=argv)
    assert not first["failed"], first
    os.kill(first["pid"], signal.SIGKILL)
    wait_gone(first["pid"])
    assert vm.sock.is_socket()  # left behind

    for check in (True, False):
        stop = vm.run("stopped", check=check)
        assert not stop["failed"] and not stop["changed"] and stop["previous_status"] == "stopped", stop

    again = vm.run("started", start_argv=argv)
    assert not again["failed"] and again["changed"] and again["pid"] != first["pid"], again
    assert answers(vm.sock) == ("running", again["pid"])


def test_bad_inputs_fail_clearly_and_change_nothing(vm: Vm) -> None:
    argv = vm.argv()
    cases: list[tuple[dict[str, t.Any], str]] = [
        (
            {"state": "started"},
            f"The QEMU of VM at {vm.sock} is not running and no start method was given (vmsnap_vm_start)",
        ),
        ({"state": "incoming"}, "no start method was given (vmsnap_vm_start)"),
        ({"state": "started", "start_argv": ["no-such-qemu-binary"]}, "no-such-qemu-binary, was not found on the PATH"),
        ({"state": "started", "start_argv": []}, "start_argv must be a non-empty list"),
        ({"state": "started", "start_argv": argv, "start_unit": "qemu@x"}, "mutually exclusive"),
        ({"state": "started", "start_unit": "../x"}, "is not a valid systemd unit name"),
        ({"state": "started", "start_argv": argv, "timeout": 0}, "timeout must be a positive number"),
        ({"state": "started", "start_argv": argv, "extra_args": ["a\0b"]}, "NUL"),
    ]
    for args, message in cases:
        result = vm.run(**args)
        assert result["failed"] and not result["changed"] and message in result["msg"], (args, result)
        assert not vm.sock.exists()
    relative = run_module(VM, socket="vm.qmp", start_argv=argv)
    assert relative["failed"] and "is relative" in relative["msg"], relative

    bad = vm.run("started", start_argv=[*argv, "-no-such-option"])
    assert bad["failed"] and not bad["changed"], bad
    assert "exited with exit code 1 before QMP answered" in bad["msg"], bad
    assert "-no-such-option" in bad["msg"] and "invalid option" in bad["output"], bad
    assert not vm.sock.exists()


def test_a_start_that_never_answers_times_out_and_is_left_running(vm: Vm) -> None:
    result = vm.run("started", start_argv=["sleep", "60"], timeout=1.5)
    assert result["failed"], result
    pid = result["pid"]
    assert (
        f"did not answer on QMP within 1.5 s after the start; the process is left running with pid {pid}"
        in (result["msg"])
    )
    assert cmdline(pid) == ["/usr/bin/sleep", "60"] or cmdline(pid)[1:] == ["60"]
    os.kill(pid, signal.SIGKILL)  # our own sleep
    wait_gone(pid)


def fake_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm: Vm, unit: str) -> Path:
    """A stand-in systemctl first on PATH (real systemd is not available here) and the unit it knows."""
    folder = tmp_path / "systemd"
    bindir = folder / "bin"
    bindir.mkdir(parents=True)
    script = bindir / "systemctl"
    script.write_text(f"#!{sys.executable}\n" + (HERE / "fake_systemctl.py").read_text())
    script.chmod(0o755)
    env_dir = folder / "run-vmsnap"
    spec = {
        "exec_start": [shutil.which("qemu-system-x86_64"), *vm.argv(daemonize=False)[1:], "$VMSNAP_QEMU_ARGS"],
        "environment_file": f"-{env_dir}/%n.env",
    }
    (folder / f"{unit}.json").write_text(json.dumps(spec))
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SYSTEMD_DIR", str(folder))
    return folder


def calls(folder: Path) -> list[dict[str, t.Any]]:
    path = folder / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_unit_path_with_a_stand_in_systemctl(vm: Vm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unit = "qemu@web01.service"
    folder = fake_systemd(tmp_path, monkeypatch, vm, unit)
    env_file = folder / "run-vmsnap" / f"{unit}.env"
    name = 'web 01\'s "vm" $HOME \\x'
    common = {"start_unit": "qemu@web01", "unit_env_dir": str(folder / "run-vmsnap")}

    check, real, again, dummy = vm.four_runs("incoming", extra_args=["-name", name], **common)
    assert check["started_with"] == {
        "unit": unit,
        "args": ["-incoming", "defer", "-name", name],
        "env_file": str(env_file),
    }
    starts = [call for call in calls(folder) if call["command"] == "start"]
    assert len(starts) == 1 and '="-incoming defer -name' in starts[0]["env_file_text"]  # written before the start
    assert cmdline(real["pid"])[-4:] == ["-incoming", "defer", "-name", name]
    assert real["status"] == "inmigrate" and again["pid"] == real["pid"]
    assert 'VMSNAP_QEMU_ARGS=""' in env_file.read_text() and env_file.stat().st_mode & 0o777 == 0o600  # emptied

    stop = vm.run("stopped", **common)
    assert stop["changed"] and gone(real["pid"]) and calls(folder)[-1]["command"] == "stop", stop
    assert not vm.run("stopped", **common)["changed"]

    plain = vm.run("started", **common)
    assert plain["changed"] and plain["status"] == "running", plain
    assert cmdline(plain["pid"])[-2:] == ["-drive", vm.argv()[-2]] and "-incoming" not in cmdline(plain["pid"])
    assert vm.run("stopped", **common)["changed"]

    failing = vm.run("started", extra_args=["-no-such-option"], **common)
    assert failing["failed"] and f"Unit {unit} failed before the QEMU of VM at {vm.sock} answered" in failing["msg"]
    assert 'VMSNAP_QEMU_ARGS=""' in env_file.read_text()  # emptied after a failed start too


def test_stop_timeout_with_and_without_kill(vm: Vm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unit = "qemu@web02.service"
    folder = fake_systemd(tmp_path, monkeypatch, vm, unit)
    common = {"start_unit": unit, "unit_env_dir": str(folder / "run-vmsnap")}
    started = vm.run("started", **common)
    assert not started["failed"], started
    spec = json.loads((folder / f"{unit}.json").read_text())
    (folder / f"{unit}.json").write_text(json.dumps({**spec, "stop_noop": True}))  # a stop that never ends QEMU

    kept = vm.run("stopped", timeout=1, **common)
    assert (
        kept["failed"] and f"(pid {started['pid']}) did not end within 1 s after systemctl stop {unit}" in kept["msg"]
    )
    assert "it was not killed" in kept["msg"] and answers(vm.sock) == ("running", started["pid"])

    killed = vm.run("stopped", timeout=1, kill_after_timeout=True, **common)
    assert not killed["failed"] and killed["changed"] and killed["killed"] is True, killed
    assert "was killed with SIGKILL" in killed["msg"] and gone(started["pid"])
