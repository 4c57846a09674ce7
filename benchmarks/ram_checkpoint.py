#!/usr/bin/env python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark: checkpoints with RAM (issue 8) - guest pause, state size and restore time, on one running VM.

Boots the tiny real Linux guest of tests/vm (TCG) with 1536 MiB of RAM and fills 1 GiB of it with random data (a
tmpfs file, so no method can skip zero pages; checked in the guest: tmpfs blocks and Shmem). Then, after one
untimed warm-up round, round by round in an order that rotates and reverses every other round, with a host `sync`
before each step, on the same VM:

- qmp_live_snapshot `mode: external`, `vmstate: true` (overlay + background-snapshot state file of one instant),
  removed with `state: absent` (merge, delete the state file) in a play of its own afterwards;
- qmp_live_snapshot `mode: internal` (vmstate defaults to true: the `snapshot-save` job), removed the same way;
- raw HMP `savevm` sent with human-monitor-command over QMP, then `delvm`.

Per checkpoint: the module's downtime_ms (for HMP savevm: the STOP/RESUME event timestamps through the module's own
pause_ms()), the pause a second QMP monitor saw, the task's wall time, the removal's wall time and the size of the
saved state; for the external checkpoint also QEMU's own migration figures (setup-time, downtime, pages).

Then the restore: qmp_vm_state `state: saved`, `after: quit`; the disk as it was is kept aside; several times (the
state file warm in the host's page cache, then dropped from it with POSIX_FADV_DONTNEED) a fresh QEMU with the
same command line plus `-incoming defer`, qmp_vm_state `state: restored`, and the guest's serial shell answering;
the first restored guest's 1 GiB of random data is compared (md5) with the one saved.

Prints Markdown tables for docs/performance.md (every sample on stderr as JSON too). Not a test: asserts nothing.

Usage (from the repo root):  make bench-ram   [BENCH_RAM_ROUNDS=5] [BENCH_RAM_RESTORES=3]
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

from _timing import timed_play

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ROUNDS = int(os.environ.get("BENCH_RAM_ROUNDS", "5"))
RESTORES = int(os.environ.get("BENCH_RAM_RESTORES", "3"))  # per page-cache state (warm, cold)
GUEST_MIB = int(os.environ.get("BENCH_RAM_GUEST_MIB", "1536"))
FILL_MIB = int(os.environ.get("BENCH_RAM_FILL_MIB", "1024"))
BOOT_TIMEOUT = 120.0
TARGET = 50.0  # HMP savevm pause / external-with-RAM pause
LIVE = "vmsnap.qemu.qmp_live_snapshot"
STATE = "vmsnap.qemu.qmp_vm_state"
EXTERNAL, INTERNAL, HMP = "external", "internal", "hmp-savevm"
METHODS = {
    EXTERNAL: "qmp_live_snapshot external + vmstate (background-snapshot)",
    INTERNAL: "qmp_live_snapshot internal + vmstate (`snapshot-save`)",
    HMP: "HMP `savevm` over QMP (raw)",
}
MIB = 2**20

sys.path.insert(0, str(REPO / "tests" / "vm"))
tiny_guest = importlib.import_module("tiny_guest")
# The collection copy that `make copy` made, copied once more into a private folder: a `make copy` elsewhere
# during the run (it deletes and rebuilds build/src) must not pull the modules away between plays.
SOURCE = Path((os.environ.get("ANSIBLE_COLLECTIONS_PATH") or str(REPO / "build" / "src")).split(os.pathsep)[0])
COLLECTIONS = Path(tempfile.mkdtemp(prefix="vmsnap-ram-collections-"))
shutil.copytree(SOURCE / "ansible_collections" / "vmsnap" / "qemu", COLLECTIONS / "ansible_collections/vmsnap/qemu")
os.environ["ANSIBLE_COLLECTIONS_PATH"] = str(COLLECTIONS)
sys.path.insert(0, str(COLLECTIONS))  # the pause_ms() and QMP client the modules themselves run
_qmp = importlib.import_module("ansible_collections.vmsnap.qemu.plugins.module_utils._qmp")


class Monitor:
    """A second QMP monitor of this script alone: records every event (QEMU's timestamps), answers queries."""

    def __init__(self, path: Path) -> None:
        self.events: list[dict[str, t.Any]] = []
        self._replies: dict[str, dict[str, t.Any]] = {}
        self._cond = threading.Condition()
        self._next_id = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(10)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rb")
        json.loads(self._file.readline())  # greeting
        self._sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        json.loads(self._file.readline())
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            for line in self._file:
                message = json.loads(line)
                with self._cond:
                    if "event" in message:
                        self.events.append(message)
                    elif "id" in message:
                        self._replies[str(message["id"])] = message
                    self._cond.notify_all()
        except (OSError, ValueError):
            return

    def command(self, name: str, arguments: dict[str, t.Any] | None = None, timeout: float = 30.0) -> t.Any:
        self._next_id += 1
        ident = f"bench-{self._next_id}"
        message: dict[str, t.Any] = {"execute": name, "id": ident}
        if arguments is not None:
            message["arguments"] = arguments
        self._sock.sendall(json.dumps(message).encode() + b"\n")
        with self._cond:
            if not self._cond.wait_for(lambda: ident in self._replies, timeout):
                raise RuntimeError(f"no reply to {name} on the observer monitor within {timeout} s")
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise RuntimeError(f"{name} failed: {reply['error']}")
        return reply.get("return")

    def mark(self) -> int:
        time.sleep(0.2)  # let events QEMU already sent arrive
        with self._cond:
            return len(self.events)

    def pause_ms(self, start: int, end: int) -> float:
        with self._cond:
            events = [e for e in self.events[start:end] if e["event"] in ("STOP", "RESUME")]
        return _qmp.pause_ms(events)

    def stops(self, start: int, end: int) -> int:
        with self._cond:
            return sum(1 for e in self.events[start:end] if e["event"] == "STOP")

    def close(self) -> None:
        self._sock.close()


def guest(vm: t.Any, command: str, timeout: float = 60.0) -> str:
    rc, out = vm.run(command, timeout=timeout)
    if rc != 0:
        raise RuntimeError(f"{command!r} failed in the guest ({rc}): {out}")
    return str(out)


def meminfo_kib(vm: t.Any) -> dict[str, int]:
    fields = {}
    for line in guest(vm, "cat /proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        if rest.strip():
            fields[name.strip()] = int(rest.split()[0])
    return fields


def fill_guest_ram(vm: t.Any) -> dict[str, t.Any]:
    """FILL_MIB of random data in a tmpfs of its own (/run is only half the RAM); checks that RAM really holds it."""
    started = time.perf_counter()
    guest(
        vm,
        f"mkdir -p /fill && mount -t tmpfs -o size={FILL_MIB + 64}m tmpfs /fill && "
        f"dd if=/dev/urandom of=/fill/ram bs=1M count={FILL_MIB} 2>/dev/null && sync",
        timeout=1800,
    )
    seconds = time.perf_counter() - started
    used_kib = int(guest(vm, "du -k /fill/ram").split()[0])  # tmpfs blocks: pages that exist
    info = meminfo_kib(vm)
    if used_kib < FILL_MIB * 1024 or info.get("Shmem", 0) < FILL_MIB * 1024:
        raise RuntimeError(f"/fill/ram does not hold {FILL_MIB} MiB of RAM: du {used_kib} KiB, meminfo {info}")
    return {
        "seconds": seconds,
        "tmpfs_kib": used_kib,
        "df": guest(vm, "df -k /fill").strip(),
        "meminfo": info,
    }


def play(tasks: list[dict[str, t.Any]], work: Path, name: str) -> dict[str, float]:
    """timed_play, but a failed module task (ignore_errors) is reported by its saved result, not raised here."""
    try:
        timed_play(tasks, work, name)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"play {name}: {exc}", file=sys.stderr)
    timings = work / f"{name}.timings.jsonl"
    rows = [json.loads(line) for line in timings.read_text().splitlines()] if timings.exists() else []
    return {row["task"]: row["seconds"] * 1000 for row in rows}


def module_tasks(name: str, module: str, args: dict[str, t.Any], result: Path) -> list[dict[str, t.Any]]:
    return [
        {"name": name, module: args, "register": "result", "ignore_errors": True},
        {"name": "keep-result", "ansible.builtin.copy": {"content": "{{ result | to_json }}", "dest": str(result)}},
    ]


def read_result(path: Path) -> dict[str, t.Any]:
    if not path.exists():
        return {"failed": True, "msg": f"no result saved in {path}"}
    return t.cast("dict[str, t.Any]", json.loads(path.read_text()))


def snapshot_vmstate_bytes(monitor: Monitor, tag: str) -> int | None:
    for node in monitor.command("query-named-block-nodes") or []:
        for snap in (node.get("image") or {}).get("snapshots") or []:
            if snap.get("name") == tag:
                return int(snap.get("vm-state-size", 0))
    return None


def module_round(vm: t.Any, method: str, rnd: str, work: Path, monitor: Monitor) -> dict[str, t.Any]:
    """Play 1: command: true, the checkpoint. Then its size. Play 2: its removal (state=absent)."""
    name = f"bench-{method}-{rnd}"
    args: dict[str, t.Any] = {"socket": str(vm.qmp_socket), "name": name}
    if method == EXTERNAL:
        args.update(mode="external", vmstate=True)
    created, removed = work / f"{method}-{rnd}-create.json", work / f"{method}-{rnd}-remove.json"
    tasks = [{"name": "command-true", "ansible.builtin.command": {"argv": ["true"]}, "changed_when": False}]
    start = monitor.mark()
    wall = play(tasks + module_tasks("create", LIVE, args, created), work, f"ram-{method}-{rnd}-create")
    end = monitor.mark()
    create = read_result(created)
    sample: dict[str, t.Any] = {
        "downtime": create.get("downtime_ms"),
        "elapsed": create.get("elapsed_ms"),
        "wall": wall.get("create"),
        "baseline": wall.get("command-true"),
        "observed": monitor.pause_ms(start, end),
        "stops": monitor.stops(start, end),
    }
    if create.get("failed") or not create.get("changed"):
        sample["error"] = f"create: {create.get('msg')}"
    if method == EXTERNAL and create.get("vmstate_file"):
        state = Path(create["vmstate_file"])
        if state.exists():
            stat = state.stat()
            sample.update(file_bytes=stat.st_size, allocated_bytes=stat.st_blocks * 512)
        sample["state_bytes"] = (create.get("vmstate") or {}).get("size")
        migration = monitor.command("query-migrate") or {}
        ram = migration.get("ram") or {}
        sample["migration"] = {
            key: migration.get(key) for key in ("status", "setup-time", "downtime", "total-time")
        } | {f"ram-{key}": ram.get(key) for key in ("normal", "normal-bytes", "duplicate", "page-size", "total")}
    elif method == INTERNAL:
        sample["state_bytes"] = snapshot_vmstate_bytes(monitor, name)
    remove_args = dict(args, state="absent")
    remove_args.pop("vmstate", None)
    start = monitor.mark()
    wall = play(module_tasks("remove", LIVE, remove_args, removed), work, f"ram-{method}-{rnd}-remove")
    end = monitor.mark()
    remove = read_result(removed)
    sample.update(
        remove_wall=wall.get("remove"),
        remove_downtime=remove.get("downtime_ms"),
        remove_stops=monitor.stops(start, end),
    )
    if remove.get("failed") or not remove.get("changed"):
        sample["error"] = f"{sample.get('error', '')} remove: {remove.get('msg')}".strip()
    if method == EXTERNAL and create.get("vmstate_file"):
        sample["state_file_left"] = Path(create["vmstate_file"]).exists()
    return sample


def hmp(qmp: t.Any, command: str) -> None:
    reply = str(qmp.execute("human-monitor-command", {"command-line": command}, timeout=600))
    if reply.strip():  # savevm and delvm print nothing unless they fail; errors are text, never QMP errors
        raise RuntimeError(f"HMP {command} failed: {reply.strip()}")


def hmp_round(vm: t.Any, rnd: str, monitor: Monitor) -> dict[str, t.Any]:
    """Raw HMP savevm over the VM's QMP socket, its pause from STOP/RESUME exactly as the module computes it."""
    tag = f"bench-hmp-{rnd}"
    start = monitor.mark()
    wall_started = time.perf_counter()
    with _qmp.QmpClient(str(vm.qmp_socket), 5.0, 600.0) as qmp:
        qmp.poll_events()
        qmp.take_events(("STOP", "RESUME"))
        started = time.perf_counter()
        hmp(qmp, f'savevm "{tag}"')
        elapsed = (time.perf_counter() - started) * 1000
        qmp.poll_events()
        if not any(event.get("event") == "RESUME" for event in qmp.events):
            resumed = qmp.wait_event(lambda event: event.get("event") == "RESUME", 5.0)
            if resumed is not None:
                qmp.events.append(resumed)
        events = qmp.take_events(("STOP", "RESUME"))
    wall = (time.perf_counter() - wall_started) * 1000
    end = monitor.mark()
    state_bytes = snapshot_vmstate_bytes(monitor, tag)
    remove_started = time.perf_counter()
    with _qmp.QmpClient(str(vm.qmp_socket), 5.0, 600.0) as qmp:
        hmp(qmp, f'delvm "{tag}"')
    return {
        "downtime": _qmp.pause_ms(events),
        "elapsed": elapsed,
        "wall": wall,
        "baseline": None,
        "observed": monitor.pause_ms(start, end),
        "stops": monitor.stops(start, end),
        "state_bytes": state_bytes,
        "remove_wall": (time.perf_counter() - remove_started) * 1000,
        "remove_downtime": 0.0,
    }


def anon_huge_kib(pid: int) -> int | None:
    """The QEMU process's RAM in transparent huge pages (a write-protect splits them)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def wait_for_incoming(vm: t.Any, timeout: float = 60.0) -> str:
    """Until the fresh QEMU answers on QMP; returns its status (inmigrate while it waits for a state)."""
    deadline = time.monotonic() + timeout
    while True:
        if vm.returncode is not None:
            raise RuntimeError(f"the waiting QEMU exited with {vm.returncode}")
        try:
            with _qmp.QmpClient(str(vm.qmp_socket), 1.0, 10.0) as qmp:
                return str(qmp.execute("query-status")["status"])
        except (OSError, _qmp.QmpConnectionError, _qmp.QmpTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def drop_from_page_cache(path: Path) -> None:
    """Only this file's pages, so that nothing else on the machine is touched."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sha256_seconds(path: Path) -> float:
    """What the restore's size + sha256 check of the state file costs by itself (same 1 MiB chunks)."""
    digest = hashlib.sha256()
    started = time.perf_counter()
    with open(path, "rb") as source:
        while chunk := source.read(MIB):
            digest.update(chunk)
    return time.perf_counter() - started


def save_for_restore(vm: t.Any, work: Path, monitor: Monitor) -> dict[str, t.Any]:
    """qmp_vm_state state=saved after=quit; the guest's RAM-only marker and data checksum first."""
    guest(vm, "echo restored-from-the-bench-state > /run/marker")
    started = time.perf_counter()
    md5 = guest(vm, "md5sum /fill/ram", timeout=600).split()[0]
    md5_seconds = time.perf_counter() - started
    state = work / "restore" / "vm.vmstate"
    state.parent.mkdir()
    result = work / "save.json"
    args = {"socket": str(vm.qmp_socket), "path": str(state), "after": "quit"}
    start = monitor.mark()
    wall = play(module_tasks("save", STATE, args, result), work, "ram-save-for-restore")
    end = monitor.mark()
    saved = read_result(result)
    try:
        vm._proc.wait(timeout=60)  # noqa: SLF001 - QEMU quits by itself (after=quit)
    except subprocess.TimeoutExpired:
        print("QEMU did not quit after the save", file=sys.stderr)
    return {
        "state": state,
        "md5": md5,
        "md5_seconds": md5_seconds,
        "downtime": saved.get("downtime_ms"),
        "elapsed": saved.get("elapsed_ms"),
        "size": saved.get("size"),
        "wall": wall.get("save"),
        "observed": monitor.pause_ms(start, end),
        "error": saved.get("msg") if saved.get("failed") else None,
    }


def restore_sample(
    image: t.Any, disk: Path, kept: Path, work: Path, extra: list[str], state: Path, index: int, cold: bool, md5: str
) -> dict[str, t.Any]:
    """A fresh QEMU with -incoming defer, qmp_vm_state state=restored, until the guest's shell answers."""
    subprocess.run(["cp", "--sparse=always", str(kept), str(disk)], check=True)  # the disk as it was at the save
    os.sync()
    if cold:
        drop_from_page_cache(state)
    vm = tiny_guest.GuestVM(image, [disk], work / "vm", memory_mib=GUEST_MIB, extra_args=[*extra, "-incoming", "defer"])
    result = work / f"restore-{index}.json"
    args = {"socket": str(vm.qmp_socket), "path": str(state), "state": "restored"}
    sample: dict[str, t.Any] = {"cache": "cold" if cold else "warm"}
    try:
        started = time.perf_counter()
        vm.start()
        sample["status_before"] = wait_for_incoming(vm)
        qmp_ready = time.perf_counter()
        wall = play(module_tasks("restore", STATE, args, result), work, f"ram-restore-{index}")
        played = time.perf_counter()
        restored = read_result(result)
        if restored.get("failed"):
            sample["error"] = restored.get("msg")
            return sample
        vm.attach_restored(timeout=60)
        answered = time.perf_counter()
        sample.update(
            qemu_start=(qmp_ready - started) * 1000,
            task_wall=wall.get("restore"),
            load=restored.get("elapsed_ms"),
            play_wall=(played - qmp_ready) * 1000,
            shell=(answered - played) * 1000,
            total=(answered - started) * 1000,
            counted=(qmp_ready - started + answered - played) * 1000 + float(wall.get("restore") or 0.0),
            status_after=restored.get("vm_status"),
            marker=guest(vm, "cat /run/marker").strip(),
            tmpfs_kib=int(guest(vm, "du -k /fill/ram").split()[0]),
        )
        if index == 0:
            sample["md5_matches"] = guest(vm, "md5sum /fill/ram", timeout=600).split()[0] == md5
        with _qmp.QmpClient(str(vm.qmp_socket), 5.0, 30.0) as qmp:
            qmp.execute("quit")
        vm._proc.wait(timeout=60)  # noqa: SLF001 - our own QEMU
        return sample
    finally:
        vm.close()


def values(samples: list[dict[str, t.Any]], key: str) -> list[float]:
    return [float(s[key]) for s in samples if s.get(key) is not None and not s.get("error")]


def spread(numbers: list[float], digits: int = 1) -> str:
    if not numbers:
        return "-"
    return (
        f"{statistics.median(numbers):.{digits}f} ({min(numbers):.{digits}f}-{max(numbers):.{digits}f}; "
        f"n={len(numbers)})"
    )


def every(numbers: list[float], digits: int = 1) -> str:
    return ", ".join(f"{value:.{digits}f}" for value in numbers) or "-"


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f} MiB"


def machine() -> list[str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True)
    core = subprocess.run(
        [str(Path(sys.executable).parent / "ansible"), "--version"], capture_output=True, text=True, check=True
    )
    date = subprocess.run(["date"], capture_output=True, text=True, check=True).stdout.strip()
    return [
        f"date: {date} ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        f"machine: {cpu}, nproc {os.cpu_count()}, {platform.system()} {platform.release()}, "
        f"load average at the end {os.getloadavg()[0]:.2f}",
        f"tools: {qemu.stdout.splitlines()[0]}, TCG (no KVM); {core.stdout.splitlines()[0]}; "
        f"Python {platform.python_version()}",
    ]


def report(
    samples: dict[str, list[dict[str, t.Any]]],
    warmup: dict[str, dict[str, t.Any]],
    orders: list[list[str]],
    fill: dict[str, t.Any],
    huge: dict[str, int | None],
    saved: dict[str, t.Any],
    restores: list[dict[str, t.Any]],
    sha: dict[str, float],
    runtime: float,
) -> None:
    for line in machine():
        print(line)
    info = fill["meminfo"]
    used_kib = info["MemTotal"] - info["MemAvailable"]
    print(
        f"guest: tiny guest of tests/vm, -m {GUEST_MIB} (MemTotal {info['MemTotal'] / 1024:.0f} MiB), "
        f"{FILL_MIB} MiB of /dev/urandom in a tmpfs (du {fill['tmpfs_kib'] / 1024:.0f} MiB, Shmem "
        f"{info['Shmem'] / 1024:.0f} MiB, filled in {fill['seconds']:.0f} s), MemTotal-MemAvailable "
        f"{used_kib / 1024:.0f} MiB; one 64 MiB ext4 qcow2 disk; idle otherwise"
    )
    print(
        f"run: 1 warm-up round + {ROUNDS} rounds, order rotating and reversed every other round, host `sync` before "
        f"each step; {2 * RESTORES} restores; whole run {runtime / 60:.1f} min"
    )
    print()
    print("Guest pause (ms) and times, median (min-max; n):")
    print()
    print(
        "| method | pause, downtime_ms | pause seen by a 2nd QMP monitor | task wall time (ms) "
        "| wall minus `command: true` (ms) | removal wall time (ms) | saved state |"
    )
    print("|---|---|---|---|---|---|---|")
    for method, label in METHODS.items():
        rows = samples[method]
        own = [s["wall"] - s["baseline"] for s in rows if s.get("baseline") is not None and not s.get("error")]
        wall = spread(values(rows, "wall"), 0) + (" (in-process QMP client, no Ansible)" if method == HMP else "")
        sizes = values(rows, "state_bytes")
        print(
            f"| {label} | {spread(values(rows, 'downtime'))} | {spread(values(rows, 'observed'))} | {wall} "
            f"| {spread(own, 0) if own else '-'} | {spread(values(rows, 'remove_wall'), 0)} "
            f"| {mib(statistics.median(sizes)) if sizes else '-'} |"
        )
    baseline = [v for m in (EXTERNAL, INTERNAL) for v in values(samples[m], "baseline")]
    print(f"| `command: true` task (Ansible's fixed cost) | | | {spread(baseline, 0)} | | | |")
    print()
    print("Every sample, pause in ms (downtime_ms; rounds in the order run):")
    print()
    print("| round | order | " + " | ".join(METHODS) + " | savevm / external |")
    print("|---|---|" + "---|" * len(METHODS) + "---|")
    warm = [f"{warmup[m]['downtime']:.1f}" if warmup.get(m, {}).get("downtime") is not None else "-" for m in METHODS]
    print(f"| warm-up (not counted) | {', '.join(orders[0])} | " + " | ".join(warm) + " | |")
    paired = []
    for index in range(ROUNDS):
        cells = []
        for method in METHODS:
            sample = samples[method][index]
            cell = "failed" if sample.get("error") else f"{sample['downtime']:.1f}"
            cells.append(cell)
        ext, sv = samples[EXTERNAL][index], samples[HMP][index]
        ratio = "-"
        if not ext.get("error") and not sv.get("error") and ext["downtime"]:
            paired.append(sv["downtime"] / ext["downtime"])
            ratio = f"{paired[-1]:.1f}x"
        print(f"| {index + 1} | {', '.join(orders[index + 1])} | " + " | ".join(cells) + f" | {ratio} |")
    print()
    ext_pause, sv_pause = values(samples[EXTERNAL], "downtime"), values(samples[HMP], "downtime")
    print("| ratio / target | value | target | met |")
    print("|---|---|---|---|")
    if ext_pause and sv_pause:
        ratio = statistics.median(sv_pause) / statistics.median(ext_pause)
        worst = min(sv_pause) / max(ext_pause)
        print(
            f"| HMP savevm pause / external-with-RAM pause (medians) | {statistics.median(sv_pause):.1f} ms / "
            f"{statistics.median(ext_pause):.1f} ms = **{ratio:.1f}x** | >= {TARGET:.0f}x "
            f"| **{'yes' if ratio >= TARGET else 'no'}** |"
        )
        print(
            f"| the same, round by round | {min(paired):.1f}x-{max(paired):.1f}x "
            f"(every round: {every(paired)}) | >= {TARGET:.0f}x "
            f"| {sum(r >= TARGET for r in paired)} of {len(paired)} rounds |"
        )
        print(
            f"| worst case: shortest savevm pause / longest external pause | {min(sv_pause):.1f} ms / "
            f"{max(ext_pause):.1f} ms = **{worst:.1f}x** | >= {TARGET:.0f}x | {'yes' if worst >= TARGET else 'no'} |"
        )
        internal = values(samples[INTERNAL], "downtime")
        if internal:
            print(
                f"| module internal + vmstate pause / HMP savevm pause (medians) | "
                f"{statistics.median(internal) / statistics.median(sv_pause):.2f}x | - | - |"
            )
    else:
        print("| HMP savevm pause / external-with-RAM pause | not measured (a method failed every round) | 50x | - |")
    print()
    print("Where the external checkpoint's pause goes (QEMU's own `query-migrate` figures after each checkpoint):")
    print()
    print(
        "| round | pause (STOP->RESUME) | migration setup-time | migration downtime | rest (stop, overlay "
        "transaction, migrate command) | state written in (total-time) | task wall time |"
    )
    print("|---|---|---|---|---|---|---|")
    for index, sample in enumerate([warmup[EXTERNAL], *samples[EXTERNAL]]):
        mig = sample.get("migration") or {}
        if sample.get("error") or mig.get("setup-time") is None:
            continue
        rest = sample["downtime"] - mig["setup-time"] - mig["downtime"]
        print(
            f"| {'warm-up' if index == 0 else index} | {sample['downtime']:.1f} ms | {mig['setup-time']} ms "
            f"| {mig['downtime']} ms | {rest:.1f} ms | {mig['total-time']} ms | {sample['wall']:.0f} ms |"
        )
    print(
        f"\nQEMU process RAM in transparent huge pages (host AnonHugePages): {huge.get('before')} KiB before the "
        f"first checkpoint, {huge.get('after-warm-up')} KiB after the warm-up round, {huge.get('end')} KiB at the end"
    )
    print()
    print("State size against RAM in use:")
    print()
    print("| what | size |")
    print("|---|---|")
    print(f"| guest RAM (`-m`) | {GUEST_MIB} MiB |")
    print(f"| RAM in use in the guest: MemTotal - MemAvailable | {used_kib / 1024:.1f} MiB |")
    print(
        f"| of it the random data in the tmpfs (du; Shmem) | {fill['tmpfs_kib'] / 1024:.1f} MiB; "
        f"{info['Shmem'] / 1024:.1f} MiB |"
    )
    ext = [s for s in samples[EXTERNAL] if not s.get("error")]
    if ext:
        last = ext[-1]
        mig = last.get("migration") or {}
        page = int(mig.get("ram-page-size") or 4096)
        normal, zero = int(mig.get("ram-normal") or 0), int(mig.get("ram-duplicate") or 0)
        rest = int(last["state_bytes"]) - normal * (page + 8) - zero * 9
        print(
            f"| external + vmstate: state file (result `vmstate.size`; every round) | "
            f"{mib(last['state_bytes'])} ({every([v / MIB for v in values(ext, 'state_bytes')])} MiB) |"
        )
        print(
            f"| the same file on disk: st_size / allocated | {mib(last.get('file_bytes'))} / "
            f"{mib(last.get('allocated_bytes'))} (space reserved for RAM + margin before the save) |"
        )
        print(
            f"| of it RAM pages with data (QEMU `ram.normal` x 4 KiB) | {mib(normal * page)} ({normal} pages); "
            f"zero pages sent as 9-byte markers: {zero} ({mib(zero * page)} of RAM) |"
        )
        print(
            "| the rest: device state, RAMBlock list and page headers beyond 8 bytes/page (estimate) "
            f"| {rest / 1024:.0f} KiB |"
        )
    for method in (INTERNAL, HMP):
        sizes = values(samples[method], "state_bytes")
        if sizes:
            print(f"| {METHODS[method]}: `vm-state-size` in the qcow2 | {mib(statistics.median(sizes))} |")
    if saved.get("size"):
        print(f"| qmp_vm_state `state: saved` (for the restores below) | {mib(saved['size'])} |")
    print()
    print(
        f"Restore: qmp_vm_state `state: saved`, `after: quit` first: downtime_ms {saved.get('downtime')} (2nd monitor "
        f"{saved.get('observed')}), elapsed_ms {saved.get('elapsed')}, task {saved.get('wall') or 0:.0f} ms"
        + (f"; FAILED: {saved['error']}" if saved.get("error") else "")
    )
    print()
    print(
        "| # | state file in page cache | QEMU start -> QMP answers (inmigrate) | restore task wall time "
        "| of it the load (elapsed_ms) | ansible-playbook process | guest shell answers after | total: QEMU start "
        "-> guest shell answers | the same, counting the task only (not ansible-playbook's start-up) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for index, sample in enumerate(restores):
        if sample.get("error"):
            print(f"| {index + 1} | {sample['cache']} | failed: {sample['error']} | | | | | | |")
            continue
        print(
            f"| {index + 1} | {sample['cache']} | {sample['qemu_start']:.0f} ms | {sample['task_wall']:.0f} ms "
            f"| {sample['load']:.0f} ms | {sample['play_wall']:.0f} ms | {sample['shell']:.0f} ms "
            f"| **{sample['total'] / 1000:.2f} s** | {sample['counted'] / 1000:.2f} s |"
        )
    for cache in ("warm", "cold"):
        rows = [s for s in restores if s["cache"] == cache]
        print(
            f"| median, {cache} | | {spread(values(rows, 'qemu_start'), 0)} | {spread(values(rows, 'task_wall'), 0)} "
            f"| {spread(values(rows, 'load'), 0)} | {spread(values(rows, 'play_wall'), 0)} "
            f"| {spread(values(rows, 'shell'), 0)} | {spread([v / 1000 for v in values(rows, 'total')], 2)} s "
            f"| {spread([v / 1000 for v in values(rows, 'counted')], 2)} s |"
        )
    first = restores[0] if restores else {}
    print(
        f"\nrestored guests: status {sorted({str(s.get('status_after')) for s in restores})}, RAM-only marker "
        f"{sorted({str(s.get('marker')) for s in restores})}, tmpfs "
        f"{sorted({s.get('tmpfs_kib') for s in restores if s.get('tmpfs_kib')})} KiB; "
        f"the first one's {FILL_MIB} MiB md5 "
        f"{'matches' if first.get('md5_matches') else 'DOES NOT match'} the saved guest's (md5 in the guest took "
        f"{saved.get('md5_seconds', 0):.0f} s)"
    )
    print(
        f"sha256 of the {mib(saved.get('size'))} state file on the host, as the restore checks it: "
        f"{sha['warm']:.2f} s from the page cache, {sha['cold']:.2f} s after dropping it from the cache"
    )
    errors = [(m, i, s["error"]) for m in METHODS for i, s in enumerate(samples[m]) if s.get("error")]
    for method, index, error in errors:
        print(f"FAILED: {method} round {index + 1}: {error}")
    print(f"guest fill: {fill['df']}", file=sys.stderr)
    print("raw samples:", json.dumps({"rounds": samples, "warm-up": warmup, "restores": restores}), file=sys.stderr)


def main() -> int:
    began = time.perf_counter()
    cache = tiny_guest.default_cache_dir()
    samples: dict[str, list[dict[str, t.Any]]] = {method: [] for method in METHODS}
    warmup: dict[str, dict[str, t.Any]] = {}
    orders: list[list[str]] = []
    huge: dict[str, int | None] = {}
    monitor = None
    # Short path: AF_UNIX socket paths are limited to 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="vmsnap-ram-", dir=os.environ.get("BENCH_DIR")))
    try:
        image = tiny_guest.build_tiny_guest(cache)
        disk = tiny_guest.make_ext4_qcow2(work / "data.qcow2", size_mib=64)
        observer_socket = work / "vm" / "observer.sock"
        extra = ["-qmp", f"unix:{observer_socket},server=on,wait=off"]
        vm = tiny_guest.GuestVM(image, [disk], work / "vm", memory_mib=GUEST_MIB, extra_args=extra)
        with vm:
            vm.wait_ready(BOOT_TIMEOUT)
            print(f"guest up (QEMU pid {vm.pid}); filling {FILL_MIB} MiB of its RAM", file=sys.stderr)
            fill = fill_guest_ram(vm)
            print(f"filled in {fill['seconds']:.0f} s: {fill['df']}", file=sys.stderr)
            monitor = Monitor(observer_socket)
            huge["before"] = anon_huge_kib(vm.pid)
            order = list(METHODS)
            for index, rnd in enumerate(["warm-up", *map(str, range(1, ROUNDS + 1))]):
                shift = index % len(order)
                ordered = order[shift:] + order[:shift]
                ordered = ordered[::-1] if index % 2 else ordered  # no method always follows the same one
                orders.append(ordered)
                for method in ordered:
                    os.sync()  # the state written by the step before must not be written back during this one
                    if method == HMP:
                        sample = hmp_round(vm, rnd, monitor)
                    else:
                        sample = module_round(vm, method, rnd, work, monitor)
                    if rnd == "warm-up":
                        warmup[method] = sample
                    else:
                        samples[method].append(sample)
                    print(f"round {rnd} {method}: {json.dumps(sample)}", file=sys.stderr)
                if rnd == "warm-up":
                    huge["after-warm-up"] = anon_huge_kib(vm.pid)
            huge["end"] = anon_huge_kib(vm.pid)
            os.sync()
            saved = save_for_restore(vm, work, monitor)
            print(f"saved for the restores: {saved}", file=sys.stderr)
            monitor.close()
            monitor = None
        restores: list[dict[str, t.Any]] = []
        state = t.cast(Path, saved["state"])
        sha = {"warm": 0.0, "cold": 0.0}
        if state.exists():
            kept = work / "data.qcow2.at-save"
            subprocess.run(["cp", "--sparse=always", str(disk), str(kept)], check=True)
            sha["warm"] = sha256_seconds(state)
            drop_from_page_cache(state)
            sha["cold"] = sha256_seconds(state)
            for index in range(2 * RESTORES):
                sample = restore_sample(image, disk, kept, work, extra, state, index, index % 2 == 1, saved["md5"])
                restores.append(sample)
                print(f"restore {index}: {sample}", file=sys.stderr)
        report(samples, warmup, orders, fill, huge, saved, restores, sha, time.perf_counter() - began)
        return 0
    finally:
        if monitor is not None:
            monitor.close()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(COLLECTIONS, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
