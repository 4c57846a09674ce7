# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Concurrent tasks (issue 11, item 2): real module processes at once on one VM (a real QEMU without a guest OS,
tests/vm/fleet.py) and on qcow2 images. QEMU serves one QMP client at a time, so tasks on one VM must take turns
(the per-socket lock): all succeed, a waiter that runs out names the holder and changes nothing, and a non-vmsnap
client that holds the socket is named as such.

The concurrent tasks run as module processes of their own (`python -m ...plugins.modules.X args.json`, which is
what AnsiballZ runs), because the ansible server of the other tests runs one command at a time; one task of each
test that needs it runs through `ansible` to show how the lock names a module run by ansible.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import typing as t
from pathlib import Path

from conftest import ANSIBLE, REPO, run_module
from fleet import NoOsVM, snapshot_names

PYTHON = Path(sys.executable)
LOCK_DIR = Path("/run/lock/vmsnap.qemu")


def _collections_root() -> str:
    return os.environ.get("ANSIBLE_COLLECTIONS_PATH") or str(REPO / "build" / "src")


def start_module(module: str, args: dict[str, t.Any], work: Path, check: bool = False) -> subprocess.Popen[str]:
    """A module process of its own, as AnsiballZ runs it (the args file holds ANSIBLE_MODULE_ARGS)."""
    work.mkdir(parents=True, exist_ok=True)
    args_file = work / f"{module}-{len(list(work.iterdir()))}.json"
    payload = dict(args, _ansible_check_mode=check)
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": payload}))
    env = dict(os.environ, PYTHONPATH=_collections_root(), LANG="C.UTF-8")
    argv = [str(PYTHON), "-m", f"ansible_collections.vmsnap.qemu.plugins.modules.{module}", str(args_file)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=work)


def result_of(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, t.Any]:
    out, err = proc.communicate(timeout=timeout)
    assert out.strip(), f"no result (rc {proc.returncode}): {err}"
    return t.cast("dict[str, t.Any]", json.loads(out))


def vm_lock_file(sock: Path) -> Path:
    digest = hashlib.sha256(os.path.realpath(sock).encode()).hexdigest()
    return LOCK_DIR / f"vm-{digest[:32]}.lock"


def wait_for(predicate: t.Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def qemu_img_check(image: Path) -> dict[str, t.Any]:
    proc = subprocess.run(
        ["qemu-img", "check", "-U", "--output=json", str(image)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return t.cast("dict[str, t.Any]", json.loads(proc.stdout))


def test_four_tasks_on_one_vm_take_turns(fleet_dir: Path) -> None:
    vm = NoOsVM(fleet_dir, "busy").create_disks().start()
    work = fleet_dir / "work"
    # connect_timeout 1: without turns, a task queued behind a snapshot in QEMU's listen backlog would get no
    # greeting within it and fail.
    procs = [
        start_module("qmp_live_snapshot", {"socket": str(vm.qmp), "name": "turn-a", "connect_timeout": 1}, work),
        start_module("qemu_vm_info", {"socket": str(vm.qmp), "connect_timeout": 1}, work),
        start_module("qmp_live_snapshot", {"socket": str(vm.qmp), "name": "turn-b", "connect_timeout": 1}, work),
        start_module("qemu_vm_info", {"socket": str(vm.qmp), "connect_timeout": 1}, work),
    ]
    lock = vm_lock_file(vm.qmp)
    holders: set[int] = set()
    while any(proc.poll() is None for proc in procs):  # who holds the VM's turn, while all four run
        with contextlib.suppress(OSError, IndexError, ValueError):
            holders.add(int(lock.read_text().split()[1]))
        time.sleep(0.01)
    results = [result_of(proc) for proc in procs]
    assert [r.get("failed", False) for r in results] == [False] * 4, [r.get("msg") for r in results]
    assert {procs[0].pid, procs[2].pid} <= holders  # each snapshot task held the VM in its turn
    assert results[0]["changed"] and results[2]["changed"]
    for info in (results[1], results[3]):
        (seen,) = info["vms"]
        assert seen["status"] == "running" and seen["jobs"] == []  # never a half-done snapshot job of another task
        names = [s["name"] for s in seen["block_devices"][0]["snapshots"]]
        assert set(names) <= {"turn-a", "turn-b"}
    assert sorted(snapshot_names(vm.disks[0])) == ["turn-a", "turn-b"]
    assert vm.status() == "running"
    assert not vm_lock_file(vm.qmp).exists()  # every task let go
    again = run_module("vmsnap.qemu.qmp_live_snapshot", socket=str(vm.qmp), name="turn-a")
    assert not again["failed"] and not again["changed"], again.get("msg")


def test_a_waiter_names_the_holder_and_a_foreign_client_is_named(fleet_dir: Path) -> None:
    vm = NoOsVM(fleet_dir, "held").create_disks().start()
    # A client that is not a vmsnap task (socat, libvirt, a human) connects and reads the greeting: QEMU now serves
    # it alone.
    foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    foreign.connect(str(vm.qmp))
    assert b"QMP" in foreign.recv(4096)
    try:
        # Task A (through ansible): takes the VM's turn, then waits in vain for QEMU's greeting.
        env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=_collections_root(), ANSIBLE_LOCALHOST_WARNING="0")
        args = json.dumps({"socket": str(vm.qmp), "connect_timeout": 6})
        holder = subprocess.Popen(
            [str(ANSIBLE), "localhost", "-c", "local", "-m", "vmsnap.qemu.qemu_vm_info", "-a", args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        lock = vm_lock_file(vm.qmp)
        wait_for(lambda: lock.exists() and "vmsnap.qemu.qemu_vm_info" in lock.read_text(), 30, "task A's turn")
        holder_pid = int(lock.read_text().split()[1])
        # Task B: a snapshot that runs out of lock_timeout; it names A and changes nothing.
        started = time.monotonic()
        waiter = result_of(
            start_module(
                "qmp_live_snapshot", {"socket": str(vm.qmp), "name": "never", "lock_timeout": 1}, fleet_dir / "w"
            )
        )
        assert 0.9 <= time.monotonic() - started < 10
        assert waiter["failed"] and not waiter.get("changed")
        assert waiter["msg"].startswith(
            f"Another vmsnap.qemu task is using the VM behind {vm.qmp} (held by pid {holder_pid} "
            "(vmsnap.qemu.qemu_vm_info) since "
        ), waiter["msg"]
        assert "still busy after lock_timeout 1 s" in waiter["msg"] and "Nothing was changed" in waiter["msg"]
        out, err = holder.communicate(timeout=60)
        assert "another client probably holds the socket" in out, out + err
        assert f"the socket {vm.qmp} (QEMU serves one QMP client at a time)" in out
    finally:
        foreign.close()
    assert snapshot_names(vm.disks[0]) == []
    assert vm.status() == "running"
    assert not vm_lock_file(vm.qmp).exists()


def _images(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    images = [folder / f"d{i:02}.qcow2" for i in range(count)]
    for image in images:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    return images


def test_twenty_offline_tasks_on_twenty_images(tmp_path: Path) -> None:
    images = _images(tmp_path / "many", 20)
    procs = [start_module("qcow2_snapshot", {"path": str(image), "name": "s"}, tmp_path / "w") for image in images]
    results = [result_of(proc) for proc in procs]
    assert [(r.get("failed", False), r["changed"]) for r in results] == [(False, True)] * 20
    for image in images:
        assert snapshot_names(image) == ["s"]
        assert qemu_img_check(image)["check-errors"] == 0


def test_twenty_offline_tasks_on_one_image_take_turns(tmp_path: Path) -> None:
    (image,) = _images(tmp_path / "one", 1)
    names = [f"s{i:02}" for i in range(20)]
    procs = [start_module("qcow2_snapshot", {"path": str(image), "name": name}, tmp_path / "w") for name in names]
    results = [result_of(proc) for proc in procs]
    assert [(r.get("failed", False), r["changed"]) for r in results] == [(False, True)] * 20, [
        r.get("msg") for r in results
    ]
    assert sorted(snapshot_names(image)) == names
    check = qemu_img_check(image)
    assert check["check-errors"] == 0 and not check.get("corruptions") and not check.get("leaks")
