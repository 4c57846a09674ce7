#!/usr/bin/env python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark: the workflow roles (issue 9) - what the roles add per VM, and how long a rollback takes.

Part 1, fleets: 30 running VMs without a guest OS (tests/vm/fleet.py: 64 MiB of RAM, one 16 MiB qcow2 disk, started
daemonized with the command line that is also their vmsnap_vm_start). For 1, 10 and 30 of them, in one run:

- the playbooks vmsnap.qemu.checkpoint then vmsnap.qemu.release (two ansible-playbook processes, --forks 5, which
  is Ansible's default, and optionally --forks 1), once with the method the roles pick for VMs with
  vmsnap_vm_start (external with RAM) and once with -e vmsnap_method=internal;
- a script doing the same QMP work directly, one VM after the other and 5 at a time (threads), with the QMP client
  the modules use: external with RAM = background-snapshot on, getfd, stop, overlay transaction
  (blockdev-snapshot-sync), migrate fd:, cont once the capture is done, wait until completed, settings back, fsync;
  its release = active block-commit + job-complete + dismiss, delete the overlay and the state file. Internal =
  snapshot-save / snapshot-delete jobs. Each step's outcome is checked (manifests, files, snapshots).

Part 2, rollback time: the tiny real guest of tests/vm (TCG, -m 768, started daemonized; a second QMP monitor for
this script) with 512 MiB of its RAM in use (a tmpfs filled with copies of 16 MiB of /dev/urandom). Per method
(internal, external with RAM, offline) and round: checkpoint (untimed), a RAM-only or disk marker written after it,
then the playbook vmsnap.qemu.rollback, timed from the start of ansible-playbook to QEMU's status running again
(QEMU's own RESUME timestamp, or the first query-status of a new QEMU that says running) and, separately, to the
guest agent answering; the marker is checked to be gone; then vmsnap.qemu.release (untimed).

Prints Markdown tables for docs/performance.md (samples on stderr). Not a test: asserts nothing.

Usage (from the repo root):  make bench-workflow   [BENCH_WF_PARTS=rollback,fleet] [BENCH_WF_SIZES=1,10,30]
    [BENCH_WF_INTERNAL_SIZES=1,10] [BENCH_WF_FORKS1=10] [BENCH_WF_ROLLBACKS=1]
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from _guest_bench import cpu_model, private_collections, tiny_guest, tool_versions, workspace
from _guest_bench import spread as spread_of
from fleet import NoOsVM, manifest, recap, snapshot_names

SIZES = [int(n) for n in os.environ.get("BENCH_WF_SIZES", "1,10,30").split(",") if n]
FORKS1_SIZES = [int(n) for n in os.environ.get("BENCH_WF_FORKS1", "").split(",") if n]
INTERNAL_SIZES = [int(n) for n in os.environ.get("BENCH_WF_INTERNAL_SIZES", "1,10").split(",") if n]
ROLLBACKS = int(os.environ.get("BENCH_WF_ROLLBACKS", "1"))
PARTS = os.environ.get("BENCH_WF_PARTS", "rollback,fleet").split(",")
GUEST_MIB, FILL_MIB, SEED_MIB = 768, 512, 16
SCRIPT_THREADS = 5
METHODS = ("external", "internal")
ROLLBACK_METHODS = ("internal", "external", "offline")
BOOT_TIMEOUT = 180.0

COLLECTIONS = private_collections("vmsnap-wf-collections-")
from ansible_collections.vmsnap.qemu.plugins.module_utils import _guest_agent, _qmp  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def load() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def playbook(name: str, inventory: Path, *args: str, timeout: float = 1800) -> tuple[float, str]:
    """ansible-playbook NAME; its wall time (s) and stdout. Raises with the output when it failed."""
    env = dict(os.environ, ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0", LANG="C.UTF-8")
    argv = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), name, *args]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0 or any(c.get("failed") or c.get("unreachable") for c in recap(proc.stdout).values()):
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


# -- part 1: fleets ------------------------------------------------------------------------------------------------


def fleet_inventory(path: Path, vms: list[NoOsVM]) -> Path:
    python = str(VENV_BIN / "python")
    hosts = {
        vm.name: {
            "ansible_connection": "local",
            "ansible_python_interpreter": python,
            "vmsnap_vm_name": vm.name,
            "vmsnap_qmp_socket": str(vm.qmp),
            "vmsnap_vm_start": vm.argv(),
        }
        for vm in vms
    }
    groups = {f"n{size}": {"hosts": {vm.name: None for vm in vms[:size]}} for size in SIZES}
    path.write_text(yaml.safe_dump({"all": {"children": {"guests": {"hosts": hosts}, **groups}}}, sort_keys=False))
    return path


def roles_sample(inventory: Path, manifests: Path, vms: list[NoOsVM], method: str, forks: int) -> dict[str, t.Any]:
    """checkpoint playbook, then release playbook, over the group of len(vms); both checked through the manifests."""
    args = ["--forks", str(forks), "-e", f"vmsnap_targets=n{len(vms)}", "-e", f"vmsnap_manifest_dir={manifests}"]
    if method == "internal":
        args += ["-e", "vmsnap_method=internal"]
    checkpoint, dummy = playbook("vmsnap.qemu.checkpoint", inventory, *args)
    records = [manifest(manifests, vm.name) or {} for vm in vms]
    if {(r.get("state"), r.get("method")) for r in records} != {("open", method)}:
        raise RuntimeError(f"checkpoint playbook left {[(r.get('state'), r.get('method')) for r in records]}")
    release, dummy = playbook("vmsnap.qemu.release", inventory, *args)
    if {(manifest(manifests, vm.name) or {}).get("state") for vm in vms} != {"released"}:
        raise RuntimeError("release playbook did not release every checkpoint")
    check_clean(vms)
    return {"checkpoint": checkpoint, "release": release}


def check_clean(vms: list[NoOsVM]) -> None:
    for vm in vms:
        leftovers = [p.name for p in vm.folder.iterdir() if p.name not in ("disk0.qcow2", "qmp.sock", "qemu.pid")]
        if leftovers or snapshot_names(vm.disks[0]) or vm.status() != "running":
            raise RuntimeError(f"{vm.name} not clean: {leftovers}, {snapshot_names(vm.disks[0])}, {vm.status()}")


def wait_migration(qmp: t.Any, capture_only: bool) -> None:
    """Until QEMU resumed the guest / RAM pages flow (capture_only), or the save completed."""
    while True:
        qmp.poll_events()
        if capture_only and any(e.get("event") == "RESUME" for e in qmp.events):
            return
        info = qmp.execute("query-migrate") or {}
        status, ram = info.get("status"), info.get("ram") or {}
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"migration {status}: {info.get('error-desc')}")
        if status == "completed":
            return
        if capture_only and status == "active" and ram.get("total") and ram.get("remaining", 0) < ram["total"]:
            return
        time.sleep(0.005 if capture_only else 0.02)


def script_external(vm: NoOsVM, name: str) -> None:
    """The QMP commands of an external checkpoint with RAM, then of its release, sent directly."""
    overlay, state = vm.folder / f"disk0.{name}.qcow2", vm.folder / f"{name}.vmstate"
    with _qmp.QmpClient(str(vm.qmp), 5.0, 300.0) as qmp:
        qmp.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "background-snapshot", "state": True}]}
        )
        bandwidth = (qmp.execute("query-migrate-parameters") or {})["max-bandwidth"]
        qmp.execute("migrate-set-parameters", {"max-bandwidth": 2**40})
        os.close(os.open(overlay, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            qmp.execute("getfd", {"fdname": "bench-state"}, fd=fd)
            qmp.execute("stop")
            snapshot = {"device": "drive0", "snapshot-file": str(overlay), "format": "qcow2", "mode": "absolute-paths"}
            qmp.execute("transaction", {"actions": [{"type": "blockdev-snapshot-sync", "data": snapshot}]})
            qmp.execute("migrate", {"uri": "fd:bench-state"})
            wait_migration(qmp, capture_only=True)
            if not qmp.execute("query-status")["running"]:
                qmp.execute("cont")
            wait_migration(qmp, capture_only=False)
            os.fsync(fd)
        finally:
            os.close(fd)
        qmp.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "background-snapshot", "state": False}]}
        )
        qmp.execute("migrate-set-parameters", {"max-bandwidth": bandwidth})
        # Release: merge the overlay back while the VM runs, then delete the files.
        job = f"bench-commit-{vm.name}"
        qmp.run_job("block-commit", {"job-id": job, "device": "drive0", "auto-dismiss": False}, 300.0, "job-id", True)
    overlay.unlink()
    state.unlink()


def script_internal(vm: NoOsVM, name: str) -> None:
    """snapshot-save (RAM + disk) and snapshot-delete jobs, sent directly."""
    with _qmp.QmpClient(str(vm.qmp), 5.0, 300.0) as qmp:
        node = next(b["inserted"]["node-name"] for b in qmp.execute("query-block") if b["device"] == "drive0")
        qmp.run_job(
            "snapshot-save", {"job-id": f"save-{vm.name}", "tag": name, "vmstate": node, "devices": [node]}, 300.0
        )
        qmp.run_job("snapshot-delete", {"job-id": f"del-{vm.name}", "tag": name, "devices": [node]}, 300.0)


def script_sample(vms: list[NoOsVM], method: str, threads: int, rnd: str) -> float:
    step = script_external if method == "external" else script_internal
    started = time.perf_counter()
    if threads == 1:
        for vm in vms:
            step(vm, f"bench-{rnd}")
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda vm: step(vm, f"bench-{rnd}"), vms))
    seconds = time.perf_counter() - started
    check_clean(vms)
    return seconds


def fleet_part(work: Path) -> dict[str, t.Any]:
    folder = work / "fleet"
    manifests = folder / "manifests"
    manifests.mkdir(parents=True)
    vms = [NoOsVM(folder, f"vm{i}").create_disks() for i in range(max(SIZES))]
    for vm in vms:
        vm.start()
    inventory = fleet_inventory(folder / "inventory.yml", vms)
    results: dict[str, t.Any] = {"rows": [], "load_start": load()}
    try:
        # Warm-up of the script (not counted); the roles' first run is the timed 1-VM one.
        for method in METHODS:
            script_sample(vms[:1], method, 1, f"warm-{method}")
        for size in SIZES:
            for method in METHODS:
                if method == "internal" and size not in INTERNAL_SIZES:
                    continue
                row: dict[str, t.Any] = {"size": size, "method": method}
                row["script"] = script_sample(vms[:size], method, 1, f"{size}a")
                row["roles5"] = roles_sample(inventory, manifests, vms[:size], method, 5)
                if size > 1:
                    row["script5"] = script_sample(vms[:size], method, SCRIPT_THREADS, f"{size}b")
                if size in FORKS1_SIZES:
                    row["roles1"] = roles_sample(inventory, manifests, vms[:size], method, 1)
                row["load"] = load()
                print(f"fleet sample: {json.dumps(row)}", file=sys.stderr)
                results["rows"].append(row)
    finally:
        for vm in vms:
            vm.kill()
    results["load_end"] = load()
    return results


# -- part 2: rollback time on the tiny guest ----------------------------------------------------------------------


class Watch:
    """A thread on the VM's second QMP monitor (reconnecting to each new QEMU): QEMU's STOP/RESUME timestamps,
    query-status answers and disconnects, all in wall-clock time; then, once the VM runs again, guest-agent pings."""

    def __init__(self, monitor: Path, qga: Path) -> None:
        self.monitor, self.qga = monitor, qga
        self.records: list[tuple[float, str, str]] = []  # (time, kind, detail)
        self.start = time.time()
        self.running_again: float | None = None
        self.agent_answers: float | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._qmp_loop, daemon=True)]
        self._threads[0].start()

    def _record(self, kind: str, detail: str, when: float | None = None) -> None:
        self.records.append((time.time() if when is None else when, kind, detail))
        if self.running_again is None:
            self.running_again = self._running_again()
            if self.running_again is not None:
                agent = threading.Thread(target=self._agent_loop, daemon=True)
                self._threads.append(agent)
                agent.start()

    def _running_again(self) -> float | None:
        """The first 'running' after the first sign of the VM not running (STOP, status, disconnect)."""
        down = next((at for at, kind, detail in self.records if at > self.start and detail != "running"), None)
        if down is None:
            return None
        return next((at for at, kind, detail in self.records if at > down and detail == "running"), None)

    def _qmp_loop(self) -> None:
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(0.5)
                sock.connect(str(self.monitor))
                self._follow(sock)
            except OSError:
                time.sleep(0.005)
            finally:
                sock.close()

    def _follow(self, sock: socket.socket) -> None:
        """Greeting and capabilities, then query-status every ~20 ms, recording replies and events, until EOF."""
        buffer = b""
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        connected = False
        try:
            while not self._stop.is_set():
                if connected:
                    sock.sendall(b'{"execute": "query-status"}\n')
                sock.settimeout(0.02)
                try:
                    data = sock.recv(65536)
                except (TimeoutError, socket.timeout):
                    continue
                if not data:
                    raise EOFError
                buffer += data
                while b"\n" in buffer:
                    line, dummy, buffer = buffer.partition(b"\n")
                    message = json.loads(line)
                    connected = True
                    if message.get("event") in ("STOP", "RESUME"):
                        stamp = message["timestamp"]
                        when = stamp["seconds"] + stamp["microseconds"] / 1e6
                        self._record("event", "running" if message["event"] == "RESUME" else "stopped", when)
                    elif isinstance(message.get("return"), dict) and "status" in message["return"]:
                        status = message["return"]["status"]
                        self._record("status", "running" if status == "running" else status)
        except (OSError, ValueError, EOFError):
            if connected:
                self._record("disconnect", "gone")

    def _agent_loop(self) -> None:
        while not self._stop.is_set():
            try:
                with _guest_agent.GuestAgentClient(str(self.qga), 1.0, 2.0) as agent:
                    agent.execute("guest-ping")
                    self.agent_answers = time.time()
                    return
            except (_qmp.QmpConnectionError, _qmp.QmpTimeoutError, OSError):
                time.sleep(0.05)

    def finish(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while self.agent_answers is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        for thread in self._threads:
            thread.join(5)


class Guest:
    """The tiny guest, daemonized, as vmsnap_vm_start starts it; commands through its guest agent."""

    def __init__(self, work: Path) -> None:
        image = tiny_guest.build_tiny_guest(tiny_guest.default_cache_dir())
        self.folder = work / "tg"
        self.disk = tiny_guest.make_ext4_qcow2(work / "data.qcow2", size_mib=64)
        self.monitor = self.folder / "observer.sock"
        self.pidfile = self.folder / "qemu.pid"
        vm = tiny_guest.GuestVM(
            image,
            [self.disk],
            self.folder,
            memory_mib=GUEST_MIB,
            extra_args=["-qmp", f"unix:{self.monitor},server=on,wait=off"],
        )
        self.qmp, self.qga = vm.qmp_socket, vm.qga_socket
        self.argv = [*vm.argv(serial_shell=False), "-daemonize", "-pidfile", str(self.pidfile)]
        self.folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> float:
        started = time.perf_counter()
        subprocess.run(self.argv, check=True, stdout=subprocess.DEVNULL)
        self.run("grep -q ' /mnt/data ' /proc/mounts", BOOT_TIMEOUT)
        return time.perf_counter() - started

    def run(self, command: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with _guest_agent.GuestAgentClient(str(self.qga), 2.0, 30.0) as agent:
                    args = {"path": "/bin/sh", "arg": ["-c", command], "capture-output": True}
                    pid = agent.execute("guest-exec", args)["pid"]
                    while True:
                        status = agent.execute("guest-exec-status", {"pid": pid})
                        if status.get("exited"):
                            break
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{command!r} still runs in the guest after {timeout:g} s")
                        time.sleep(0.1)
            except (_qmp.QmpConnectionError, _qmp.QmpTimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                continue
            out = (base64.b64decode(status.get("out-data", "")) + base64.b64decode(status.get("err-data", ""))).decode()
            if status.get("exitcode") != 0:
                raise RuntimeError(f"{command!r} failed in the guest ({status.get('exitcode')}): {out}")
            return out

    def fill(self) -> dict[str, t.Any]:
        started = time.perf_counter()
        self.run(
            f"mkdir -p /fill && mount -t tmpfs -o size={FILL_MIB + 64}m tmpfs /fill && "
            f"dd if=/dev/urandom of=/fill/seed bs=1M count={SEED_MIB} 2>/dev/null && i=0 && "
            f"while [ $i -lt {FILL_MIB // SEED_MIB} ]; do cat /fill/seed; i=$((i+1)); done > /fill/ram && "
            "rm /fill/seed && sync",
            600,
        )
        seconds = time.perf_counter() - started
        meminfo = dict(line.split(":", 1) for line in self.run("cat /proc/meminfo").splitlines() if ":" in line)
        kib = {key: int(value.split()[0]) for key, value in meminfo.items()}
        if kib["Shmem"] < FILL_MIB * 1024:
            raise RuntimeError(f"the guest's tmpfs does not hold {FILL_MIB} MiB of RAM: {kib}")
        return {
            "seconds": seconds,
            "shmem_mib": kib["Shmem"] / 1024,
            "used_mib": (kib["MemTotal"] - kib["MemAvailable"]) / 1024,
        }

    def stop(self) -> None:
        """QMP quit over the script's own monitor; waits until the process is gone."""
        pid = int(self.pidfile.read_text())
        with _qmp.QmpClient(str(self.monitor), 5.0, 30.0) as qmp:
            qmp.execute("quit")
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def kill(self) -> None:
        try:
            pid = int(self.pidfile.read_text())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            return


def guest_inventory(path: Path, guest: Guest, offline: bool) -> Path:
    host = {
        "ansible_connection": "local",
        "ansible_python_interpreter": str(VENV_BIN / "python"),
        "vmsnap_vm_name": "tg",
        "vmsnap_qmp_socket": str(guest.qmp),
        "vmsnap_vm_start": guest.argv,
    }
    if offline:
        host["vmsnap_disks"] = [str(guest.disk)]
    path.write_text(yaml.safe_dump({"all": {"children": {"guests": {"hosts": {"tg": host}}}}}, sort_keys=False))
    return path


def rollback_round(guest: Guest, work: Path, method: str, rnd: int) -> dict[str, t.Any]:
    manifests = work / "manifests"
    inventory = guest_inventory(work / f"inventory-{method}.yml", guest, method == "offline")
    args = ["-e", "vmsnap_targets=guests", "-e", f"vmsnap_manifest_dir={manifests}"]
    if method == "internal":
        args += ["-e", "vmsnap_method=internal"]
    sample: dict[str, t.Any] = {"method": method, "round": rnd}
    if method == "offline":
        guest.stop()
        sample["checkpoint"], dummy = playbook("vmsnap.qemu.checkpoint", inventory, *args)
        sample["boot"] = guest.start()
        sample["fill"] = guest.fill()
        marker = "/mnt/data/after-checkpoint"  # the upgrade's change: on the disk
    else:
        sample["checkpoint"], dummy = playbook("vmsnap.qemu.checkpoint", inventory, *args)
        marker = "/run/after-checkpoint"  # the upgrade's change: in RAM only
    if (manifest(manifests, "tg") or {}).get("method") != method:
        raise RuntimeError(f"the checkpoint took method {(manifest(manifests, 'tg') or {}).get('method')}")
    guest.run(f"echo upgraded > {marker} && sync")
    os.sync()
    sample["load_before"] = load()
    watch = Watch(guest.monitor, guest.qga)
    sample["playbook"], dummy = playbook("vmsnap.qemu.rollback", inventory, *args)
    watch.finish()
    sample["running"] = None if watch.running_again is None else watch.running_again - watch.start
    sample["agent"] = None if watch.agent_answers is None else watch.agent_answers - watch.start
    if guest.run(f"test -e {marker} && echo still there || echo gone").strip() != "gone":
        raise RuntimeError(f"{method} rollback left {marker} in the guest")
    sample["shmem_mib"] = float(guest.run("grep Shmem: /proc/meminfo").split()[1]) / 1024
    sample["release"], dummy = playbook("vmsnap.qemu.release", inventory, *args)
    print(f"rollback sample: {json.dumps(sample)}", file=sys.stderr)
    return sample


def rollback_part(work: Path) -> dict[str, t.Any]:
    guest = Guest(work)
    results: dict[str, t.Any] = {"samples": [], "load_start": load()}
    try:
        results["boot"] = guest.start()
        results["fill"] = guest.fill()
        print(f"tiny guest up in {results['boot']:.1f} s, filled: {results['fill']}", file=sys.stderr)
        for rnd in range(1, ROLLBACKS + 1):
            for method in ROLLBACK_METHODS if rnd % 2 else ROLLBACK_METHODS[::-1]:
                if method != "offline" and (sample := results["samples"]) and sample[-1]["method"] == "offline":
                    guest.fill()  # the offline rollback booted the guest afresh: its RAM is empty again
                results["samples"].append(rollback_round(guest, work, method, rnd))
    finally:
        guest.kill()
    results["load_end"] = load()
    return results


# -- report ---------------------------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def spread(values: list[float | None], digits: int = 2) -> str:
    return spread_of(values, digits)


def machine() -> list[str]:
    qemu, core = tool_versions()
    return [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine: {cpu_model()}, nproc {os.cpu_count()}, {platform.system()} {platform.release()}",
        f"tools: {qemu}, TCG (no KVM); {core}; Python {platform.python_version()}",
    ]


def fleet_report(fleet: dict[str, t.Any]) -> None:
    print(f"\nFleets (load average 1/5/15 min at the start {fleet['load_start']}, at the end {fleet['load_end']}):\n")
    print(
        "| VMs | method | roles: checkpoint playbook | release playbook | roles total | script, one VM after "
        "another | roles / script | roles minus script, per VM | script, 5 at a time | roles with --forks 1 | "
        "load (1 min) after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in fleet["rows"]:
        roles = row["roles5"]["checkpoint"] + row["roles5"]["release"]
        forks1 = row.get("roles1")
        script5 = f"{row['script5']:.2f} s" if "script5" in row else "-"
        roles1 = f"{forks1['checkpoint']:.2f} + {forks1['release']:.2f} s" if forks1 else "-"
        print(
            f"| {row['size']} | {row['method']} | {roles5(row, 'checkpoint')} | {roles5(row, 'release')} "
            f"| {roles:.2f} s | {row['script']:.2f} s | **{roles / row['script']:.1f}x** "
            f"| {(roles - row['script']) / row['size']:.2f} s "
            f"| {script5} | {roles1} "
            f"| {row['load'].split(' / ')[0]} |"
        )
    print("\nPer-VM slope between the smallest and the largest fleet (fixed costs drop out):\n")
    print("| method | roles (--forks 5), s per VM | script, s per VM | roles minus script, s per VM |")
    print("|---|---|---|---|")
    for method in METHODS:
        rows = [r for r in fleet["rows"] if r["method"] == method]
        if len(rows) < 2:
            continue
        small, large = rows[0], rows[-1]
        span = large["size"] - small["size"]
        roles = (total(large) - total(small)) / span
        script = (large["script"] - small["script"]) / span
        print(f"| {method} | {roles:.3f} | {script:.3f} | **{roles - script:.3f}** |")


def roles5(row: dict[str, t.Any], key: str) -> str:
    return f"{row['roles5'][key]:.2f} s"


def total(row: dict[str, t.Any]) -> float:
    return float(row["roles5"]["checkpoint"] + row["roles5"]["release"])


def rollback_report(part: dict[str, t.Any]) -> None:
    fill = part["fill"]
    print(
        f"\nRollback (tiny guest, -m {GUEST_MIB}, {FILL_MIB} MiB of RAM in a tmpfs: Shmem {fill['shmem_mib']:.0f} MiB, "
        f"MemTotal-MemAvailable {fill['used_mib']:.0f} MiB, filled in {fill['seconds']:.0f} s; first boot "
        f"{part['boot']:.1f} s; load average at the start {part['load_start']}, at the end {part['load_end']}):\n"
    )
    print(
        "| method | rollback playbook start -> QEMU status running | -> guest agent answers | rollback playbook "
        "(whole ansible-playbook) | checkpoint playbook | release playbook | every sample: running / agent (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for method in ROLLBACK_METHODS:
        rows = [s for s in part["samples"] if s["method"] == method]
        every = "; ".join(f"{s['running']:.2f} / {s['agent']:.2f}" for s in rows if s["running"] and s["agent"])
        print(
            f"| {method} | **{spread([s['running'] for s in rows])} s** | {spread([s['agent'] for s in rows])} s "
            f"| {spread([s['playbook'] for s in rows])} s | {spread([s['checkpoint'] for s in rows])} s "
            f"| {spread([s['release'] for s in rows])} s | {every} |"
        )


def main() -> int:
    began = time.perf_counter()
    results: dict[str, t.Any] = {}
    for line in machine():
        print(line)
    with workspace("vmsnap-wf-", COLLECTIONS) as work:
        for part in PARTS:  # each part's table as soon as it is done
            if part == "rollback":
                results["rollback"] = rollback_part(work)
                rollback_report(results["rollback"])
            elif part == "fleet":
                results["fleet"] = fleet_part(work)
                fleet_report(results["fleet"])
            sys.stdout.flush()
    ended = datetime.datetime.now(datetime.timezone.utc)
    print(f"\nwhole run {(time.perf_counter() - began) / 60:.1f} min, ended {ended:%H:%M} UTC, load average {load()}")
    print("raw samples:", json.dumps(results), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
