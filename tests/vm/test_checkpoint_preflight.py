# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""checkpoint_preflight against real QEMU processes (TCG, no guest OS), real images and a real tmpfs; the flush
through the guest agent against the tiny guest. Every run must leave the images byte-identical and add no file."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest
from conftest import ANSIBLE
from tiny_guest import GuestVM

MODULE = "vmsnap.qemu.checkpoint_preflight"
MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = ANSIBLE.with_name("ansible-playbook")


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


def tree(*folders: Path) -> dict[str, str]:
    """Every file under folders with its sha256 (sockets by name only)."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_socket():
                found[str(path)] = "socket"
            elif path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def start_qemu(work: Path, drives: list[tuple[Path, str]], *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    sock = work / "qmp.sock"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-display", "none", "-nodefaults", "-m", "64",
            "-qmp", f"unix:{sock},server=on,wait=off", *extra]  # fmt: skip
    for index, (path, fmt) in enumerate(drives):
        argv += ["-drive", f"file={path},format={fmt},if=virtio,id=drive{index}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:  # the socket file appears at bind(), a moment before QEMU listens
        assert proc.poll() is None and time.monotonic() < deadline, "QEMU did not start"
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(str(sock)) == 0:
                return proc, sock
        time.sleep(0.05)


def stop_qemu(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(timeout=30)


def qmp(sock: Path, command: str) -> t.Any:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(sock))
        stream = conn.makefile("rwb")
        stream.readline()
        for execute in ("qmp_capabilities", command):
            stream.write(json.dumps({"execute": execute}).encode() + b"\n")
            stream.flush()
            while True:
                reply = json.loads(stream.readline())
                if "return" in reply or "error" in reply:
                    break
        return reply


def holder(path: Path) -> subprocess.Popen[bytes]:
    """A process that keeps path open for reading (and takes no QEMU lock)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; f = open({str(path)!r}, 'rb'); print('open', flush=True); "
         "time.sleep(120)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == b"open\n"
    return proc


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def run_batch(tasks: list[tuple[dict[str, t.Any], bool]], work: Path) -> list[dict[str, t.Any]]:
    """Run the module once per (args, check mode) in one ansible-playbook process; the registered results.

    One process for many runs keeps the test fast (ansible's start-up costs far more than the module). Registered
    results carry the task warnings in "warnings".
    """
    out = work.parent / f"{work.name}-results.json"
    registered = ", ".join(f"r{index}" for index in range(len(tasks)))
    runs: list[dict[str, t.Any]] = [
        {MODULE: args, "check_mode": check, "register": f"r{index}", "ignore_errors": True}
        for index, (args, check) in enumerate(tasks)
    ]
    save = {"ansible.builtin.copy": {"content": "{{ [" + registered + "] | to_json }}", "dest": str(out)}}
    plays = [{"hosts": "localhost", "connection": "local", "gather_facts": False, "tasks": [*runs, save]}]
    playbook = work.parent / f"{work.name}-play.json"
    playbook.write_text(json.dumps(plays))
    env = dict(os.environ, ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0", LANG="C.UTF-8")
    env.setdefault("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src"))
    proc = subprocess.run(
        [str(PLAYBOOK), str(playbook)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert out.exists(), f"ansible-playbook failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    results = t.cast("list[dict[str, t.Any]]", json.loads(out.read_text()))
    out.unlink()
    playbook.unlink()
    return results


def formatted(value: t.Any, names: dict[str, str]) -> t.Any:
    if isinstance(value, list):
        return [formatted(item, names) for item in value]
    return value.format(**names) if isinstance(value, str) else value


def assert_refused(result: dict[str, t.Any], vm: str, reason: str, words: str) -> None:
    assert result.get("failed") and not result["changed"], result
    assert result["reason"] == reason, result
    assert result["msg"].startswith(f"VM {vm}: ") and words in result["msg"], result


def assert_same_answers(results: list[dict[str, t.Any]]) -> dict[str, t.Any]:
    """check, real, real again, check again: never changed, always the same answer."""
    keys = ("method", "disks", "state_file", "vmstate_disk", "msg", "status", "pid", "exists")

    def answer(result: dict[str, t.Any]) -> dict[str, t.Any]:
        needs = [{k: v for k, v in entry.items() if k != "free"} for entry in result["space"]]  # others write too
        return dict({k: result[k] for k in keys}, space=needs)

    for result in results:
        assert not result.get("failed") and not result["changed"], result
        assert answer(result) == answer(results[0])
    return results[-1]


# --- a running VM with a qcow2 and a raw disk ---------------------------------------------------------------------

RUNNING_REFUSALS: list[tuple[dict[str, t.Any], str, str]] = [
    ({}, "format", "disk {work}/b.raw is raw; an internal checkpoint needs every writable disk in qcow2"),
    ({"method": "offline"}, "method", "it is running; an offline checkpoint needs it stopped"),
    ({"method": "external"}, "method", "restarts QEMU: set vmsnap_vm_start"),
    ({"can_restart": True, "quiesce": "required"}, "quiesce", "quiesce=required, but guest_agent_socket is not set"),
    ({"can_restart": True, "quiesce": "required", "guest_agent_socket": "{work}/none.qga"}, "quiesce",
     "the guest agent at {work}/none.qga cannot flush the guest: guest agent socket {work}/none.qga does not exist"),
    # An overlay file in the way (made by the fixture): the live snapshot planner would refuse it later.
    ({"name": "cp2", "can_restart": True}, "plan", "{work}/a.vmsnap-cp2.qcow2 for drive0 already exists but is not "
     "part of that disk's chain"),
    ({"can_restart": True, "overlay_dir": "{tmpfs}"}, "space", "not enough free space on the file system of {tmpfs}: "
     "the checkpoint needs 452 MiB (RAM state 448 MiB, overlay growth 3.6 MiB), 16.0 MiB are free."),
    ({"socket": "{work}/gone.qmp", "disks": ["{work}/a.qcow2"]}, "held",
     "{work}/a.qcow2 is in use by another process (a running QEMU?)."),
    ({"name": "12"}, "input", "purely numeric"),
]  # fmt: skip


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[dict[str, t.Any]]:
    """One VM (a.qcow2, b.raw) and one ansible-playbook run over every case that needs no extra process."""
    work = tmp_path_factory.mktemp("running")
    tmpfs = tmp_path_factory.mktemp("tmpfs")
    qemu_img("create", "-q", "-f", "qcow2", str(work / "a.qcow2"), "64M")
    qemu_img("create", "-q", "-f", "raw", str(work / "b.raw"), "8M")
    (work / "a.vmsnap-cp2.qcow2").write_text("not an overlay")
    proc, sock = start_qemu(work, [(work / "a.qcow2", "qcow2"), (work / "b.raw", "raw")])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(tmpfs)], check=True, timeout=30)
    try:
        names = {"work": str(work), "tmpfs": str(tmpfs)}
        base = {"vm": "web01", "name": "cp1", "socket": str(sock)}
        external = dict(base, can_restart=True)
        tasks = [(external, check) for check in (True, False, False, True)]
        tasks.append((dict(external, quiesce="best_effort"), False))
        for args in (refusal[0] for refusal in RUNNING_REFUSALS):
            case = dict(base, **{key: formatted(value, names) for key, value in args.items()})
            tasks += [(case, False), (case, True)]
        before = tree(work, tmpfs)
        results = run_batch(tasks, work)
        assert tree(work, tmpfs) == before  # nothing written, by any run
        assert list(tmpfs.iterdir()) == []
        yield {"work": work, "sock": sock, "pid": proc.pid, "results": results, "names": names, "base": external}
    finally:
        stop_qemu(proc)
        subprocess.run(["umount", str(tmpfs)], check=True, timeout=30)


def test_running_with_restart_takes_external(running: dict[str, t.Any]) -> None:
    work = running["work"]
    result = assert_same_answers(running["results"][:4])
    assert result["method"] == "external" and result["running"] and result["status"] == "running"
    assert result["msg"] == "VM web01 can be checkpointed: external checkpoint with RAM, 2 disks"
    assert result["pid"] == running["pid"] and result["ram_size"] == 64 * MIB
    assert result["qemu_version"].count(".") == 2
    overlays = [str(work / "a.vmsnap-cp1.qcow2"), str(work / "b.raw.vmsnap-cp1.qcow2")]
    assert [disk["overlay"] for disk in result["disks"]] == overlays
    assert [(d["file"], d["format"], d["device"], d["virtual_size"]) for d in result["disks"]] == [
        (str(work / "a.qcow2"), "qcow2", "drive0", 64 * MIB),
        (str(work / "b.raw"), "raw", "drive1", 8 * MIB),
    ]
    assert result["state_file"] == str(work / "a.vmsnap-cp1.vmstate") and result["vmstate_disk"] is None
    growth = 64 * MIB * 5 // 100 + 8 * MIB * 5 // 100
    [space] = result["space"]
    assert space["path"] == str(work) and space["needed"] == growth + 448 * MIB and space["growth"] == growth
    assert result["flushed"] is False and not result.get("warnings")


def test_quiesce_best_effort_without_agent_warns(running: dict[str, t.Any]) -> None:
    result = running["results"][4]
    assert not result.get("failed") and result["flushed"] is False, result
    assert result["warnings"] == [
        "VM web01: quiesce=best_effort, but guest_agent_socket is not set; the checkpoint's disks are consistent "
        "only together with its RAM."
    ]


@pytest.mark.parametrize("index", range(len(RUNNING_REFUSALS)))
def test_running_refusals_in_both_modes(running: dict[str, t.Any], index: int) -> None:
    dummy, reason, words = RUNNING_REFUSALS[index]
    for result in running["results"][5 + 2 * index : 7 + 2 * index]:
        assert_refused(result, "web01", reason, words.format(**running["names"]))
    if reason == "space":
        assert result["space"][0]["free"] == 16 * MIB


def test_image_open_in_another_process_is_refused(running: dict[str, t.Any]) -> None:
    work = running["work"]
    child = holder(work / "a.qcow2")
    try:
        before = tree(work)
        results = run_batch([(running["base"], False), (running["base"], True)], work)
        assert tree(work) == before
        for result in results:
            assert_refused(result, "web01", "held", f"{work}/a.qcow2 by pid {child.pid} ({comm(child.pid)})")
            assert result["holders"] == [{"file": str(work / "a.qcow2"), "pid": child.pid, "command": comm(child.pid)}]
    finally:
        child.kill()
        child.wait(timeout=30)


# --- prelaunch, then running and paused: internal ------------------------------------------------------------------


def test_prelaunch_is_refused_running_and_paused_take_internal(tmp_path: Path) -> None:
    work = tmp_path / "vm"
    work.mkdir()
    disk = work / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "64M")
    proc, sock = start_qemu(work, [(disk, "qcow2")], "-S")
    try:
        args = {"vm": "web01", "name": "cp1", "socket": str(sock)}
        before = tree(work)
        [prelaunch] = run_batch([(args, False)], work)
        assert_refused(prelaunch, "web01", "status", "it is in status 'prelaunch'")
        assert prelaunch["vm_status"] == "prelaunch"
        assert qmp(sock, "cont") == {"return": {}}
        result = assert_same_answers(run_batch([(args, True), (args, False)], work))
        assert result["method"] == "internal" and result["vmstate_disk"] == str(disk) and result["state_file"] is None
        assert result["msg"] == "VM web01 can be checkpointed: internal checkpoint with RAM, 1 disk"
        assert result["disks"][0]["overlay"] is None and result["status"] == "running"
        assert qmp(sock, "stop") == {"return": {}}
        [paused] = run_batch([(args, False)], work)
        assert not paused.get("failed") and paused["status"] == "paused" and paused["method"] == "internal", paused
        assert tree(work) == before
    finally:
        stop_qemu(proc)


# --- stopped VMs ---------------------------------------------------------------------------------------------------

STOPPED_REFUSALS: list[tuple[dict[str, t.Any], str, str]] = [
    ({"method": "internal"}, "method", "it is stopped; an internal checkpoint saves RAM and needs it running"),
    ({"max_snapshots": 2}, "snapshots", "disk {a} would have 3 internal snapshots with this checkpoint, more than "
     "max_snapshots (2)"),
    ({"disks": ["{a}", "{work}/gone.qcow2"]}, "disk", "its disk image {work}/gone.qcow2 does not exist"),
    ({"disks": ["{a}", "{raw}"]}, "format", "disk {raw} is raw; an offline checkpoint needs every writable disk"),
    ({"disks": None}, "socket", "its QMP socket {stale} does not answer and vmsnap_disks is not set, so it can be "
     "checkpointed neither live nor offline."),
    ({"disks": ["{a}", "{work}/./a.qcow2"]}, "input", "disks names {a} twice"),
]  # fmt: skip


@pytest.fixture
def stopped(tmp_path: Path) -> dict[str, Path]:
    """a.qcow2 with two internal snapshots, b.qcow2 over base.qcow2, c.raw, and a stale QMP socket."""
    work = tmp_path / "vm"
    work.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(work / "a.qcow2"), "64M")
    for name in ("s1", "s2"):
        qemu_img("snapshot", "-c", name, str(work / "a.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", str(work / "base.qcow2"), "32M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(work / "base.qcow2"), "-F", "qcow2", str(work / "b.qcow2"))
    qemu_img("create", "-q", "-f", "raw", str(work / "c.raw"), "8M")
    stale = work / "stale.qmp"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # a socket file that nobody listens on: connections are refused
    return {"work": work, "a": work / "a.qcow2", "b": work / "b.qcow2", "base": work / "base.qcow2",
            "raw": work / "c.raw", "stale": stale}  # fmt: skip


def test_stopped_vm_takes_offline_and_refuses_bad_cases(stopped: dict[str, Path]) -> None:
    names = {key: str(value) for key, value in stopped.items()}
    base = {"vm": "web01", "name": "cp1", "socket": names["stale"], "disks": [names["a"], names["b"]]}
    tasks = [(dict(base, warn_snapshots=2, quiesce="required"), check) for check in (True, False, False, True)]
    for args in (refusal[0] for refusal in STOPPED_REFUSALS):
        case = {key: formatted(value, names) for key, value in dict(base, **args).items() if value is not None}
        tasks.append((case, False))
    before = tree(stopped["work"])
    results = run_batch(tasks, stopped["work"])
    assert tree(stopped["work"]) == before

    result = assert_same_answers(results[:4])
    assert result["method"] == "offline" and not result["running"] and result["status"] == "stopped"
    assert result["pid"] is None and result["qemu_version"] is None and result["ram_size"] is None
    assert result["flushed"] is False  # a stopped VM's disks need no flush; quiesce is not asked
    assert [(d["file"], d["snapshots"], d["chain_depth"], d["overlay"], d["node_name"]) for d in result["disks"]] == [
        (names["a"], 2, 0, None, None),
        (names["b"], 0, 1, None, None),
    ]
    assert result["warnings"] == [
        f"VM web01: disk {names['a']} will have 3 internal snapshots (more than 2); each one slows the guest's "
        "writes. Remove old checkpoints."
    ]
    assert result["space"][0]["growth"] == (64 * MIB + 32 * MIB) * 5 // 100
    assert result["msg"].startswith("VM web01 can be checkpointed: offline checkpoint")
    for (dummy, reason, words), refused in zip(STOPPED_REFUSALS, results[4:]):
        assert_refused(refused, "web01", reason, words.format(**names))


def test_a_held_backing_file_of_a_stopped_vm_is_refused(stopped: dict[str, Path]) -> None:
    child = holder(stopped["base"])
    try:
        args = {"vm": "web01", "name": "cp1", "disks": [str(stopped["a"]), str(stopped["b"])]}
        before = tree(stopped["work"])
        [result] = run_batch([(args, False)], stopped["work"])
        assert tree(stopped["work"]) == before
        assert_refused(result, "web01", "held", f"{stopped['base']} by pid {child.pid} ({comm(child.pid)})")
    finally:
        child.kill()
        child.wait(timeout=30)


# --- the flush through a real guest agent ---------------------------------------------------------------------------


def test_quiesce_flushes_the_guest_only_outside_check_mode(vm: GuestVM, tmp_path: Path) -> None:
    args = {"vm": "tiny", "name": "cp1", "socket": str(vm.qmp_socket), "can_restart": True, "quiesce": "required",
            "guest_agent_socket": str(vm.qga_socket)}  # fmt: skip
    checked, flushed = run_batch([(args, True), (args, False)], tmp_path / "play")
    assert not checked.get("failed") and not checked["changed"] and checked["flushed"] is False, checked
    assert not flushed.get("failed") and not flushed["changed"] and flushed["flushed"] is True, flushed
    assert flushed["method"] == "external"
    assert vm.agent("guest-fsfreeze-status") == {"return": "thawed"}
    vm.agent_disconnect()
    assert vm.poweroff() == 0
