#!/usr/bin/env python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark: guest pause per checkpoint of qmp_live_snapshot's methods against HMP savevm, on one running VM.

Boots the tiny real Linux guest of tests/vm (TCG) with 768 MiB of RAM, fills 512 MiB of it with random data
(a tmpfs file, so savevm cannot skip zero pages), and then, after one untimed warm-up round, round by round in
an order that rotates and reverses every other round, with a host `sync` before each step, on the same VM:

- the module through Ansible: internal + vmstate, internal disk-only, external, external with quiesce=required
  (one play per method and round: a `command: true` task, the snapshot, then its removal with state=absent);
- raw HMP `savevm` sent with human-monitor-command over QMP (the seed's method), then `delvm`.

For every checkpoint it keeps the module's downtime_ms, elapsed_ms and frozen_ms and the task's wall time; for
HMP savevm it computes the pause from the STOP/RESUME event timestamps with the module's own pause_ms(). A second
QMP monitor, opened by this script alone, records every STOP/RESUME of the whole run as a cross-check of the
module's figures. Prints Markdown tables for docs/performance.md. Not a test: it asserts nothing.

Usage (from the repo root, after `make deps copy`):  make bench-live   [BENCH_LIVE_ROUNDS=5]
"""

from __future__ import annotations

import datetime
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
ROUNDS = int(os.environ.get("BENCH_LIVE_ROUNDS", "5"))
GUEST_MIB = int(os.environ.get("BENCH_LIVE_GUEST_MIB", "768"))
TOUCHED_MIB = int(os.environ.get("BENCH_LIVE_TOUCHED_MIB", "512"))
BOOT_TIMEOUT = 120.0
MODULE = "vmsnap.qemu.qmp_live_snapshot"
HMP = "hmp-savevm"
# method -> label in the tables; HMP savevm is run by this script itself, the others through the module.
METHODS = {
    "vmstate": "qmp_live_snapshot internal + vmstate (`snapshot-save`)",
    "disk-only": "qmp_live_snapshot internal disk-only (`vmstate: false`)",
    "external": "qmp_live_snapshot external",
    "external-quiesce": "qmp_live_snapshot external, `quiesce: required`",
    HMP: "HMP `savevm` over QMP (raw, the seed's method)",
}

sys.path.insert(0, str(REPO / "tests" / "vm"))
tiny_guest = importlib.import_module("tiny_guest")
# The collection copy that `make copy` makes, copied once more into a private folder: a `make copy` elsewhere
# during the run (it deletes and rebuilds build/src) must not pull the module away between plays.
SOURCE = Path((os.environ.get("ANSIBLE_COLLECTIONS_PATH") or str(REPO / "build" / "src")).split(os.pathsep)[0])
COLLECTIONS = Path(tempfile.mkdtemp(prefix="vmsnap-live-collections-"))
shutil.copytree(SOURCE / "ansible_collections" / "vmsnap" / "qemu", COLLECTIONS / "ansible_collections/vmsnap/qemu")
os.environ["ANSIBLE_COLLECTIONS_PATH"] = str(COLLECTIONS)
sys.path.insert(0, str(COLLECTIONS))  # the pause_ms() and QMP client the module itself runs
_qmp = importlib.import_module("ansible_collections.vmsnap.qemu.plugins.module_utils._qmp")


class EventObserver:
    """A second QMP monitor that only listens: every event of the run, with QEMU's own timestamps."""

    def __init__(self, path: Path) -> None:
        self.events: list[dict[str, t.Any]] = []
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
                if "event" in message:
                    self.events.append(message)
        except (OSError, ValueError):
            return

    def mark(self) -> int:
        time.sleep(0.2)  # let events QEMU already sent arrive
        return len(self.events)

    def pause_ms(self, start: int, end: int) -> float:
        return _qmp.pause_ms([e for e in self.events[start:end] if e["event"] in ("STOP", "RESUME")])

    def close(self) -> None:
        self._sock.close()


def fill_guest_ram(vm: t.Any) -> str:
    """Touch TOUCHED_MIB of guest RAM with random data in a tmpfs big enough for it (/run is only half the RAM)."""
    size = TOUCHED_MIB + 64
    rc, out = vm.run(
        f"mkdir -p /fill && mount -t tmpfs -o size={size}m tmpfs /fill && "
        f"dd if=/dev/urandom of=/fill/ram bs=1M count={TOUCHED_MIB} && sync && df -m /fill && free -m",
        timeout=900,
    )
    if rc != 0:
        raise RuntimeError(f"filling the guest's RAM failed ({rc}): {out}")
    rc, used = vm.run("du -m /fill/ram")
    if rc != 0 or int(used.split()[0]) < TOUCHED_MIB:
        raise RuntimeError(f"/fill/ram is not {TOUCHED_MIB} MiB: {used}")
    return out


def module_round(vm: t.Any, method: str, rnd: str, work: Path, observer: EventObserver) -> dict[str, t.Any]:
    """One play: command: true, the snapshot, its removal. Returns the figures of this checkpoint."""
    args: dict[str, t.Any] = {"socket": str(vm.qmp_socket), "name": f"bench-{method}-{rnd}"}
    if method == "disk-only":
        args["vmstate"] = False
    elif method.startswith("external"):
        args["mode"] = "external"
    if method == "external-quiesce":
        args.update(quiesce="required", guest_agent_socket=str(vm.qga_socket))
    results = {step: work / f"{method}-{rnd}-{step}.json" for step in ("create", "remove")}
    tasks: list[dict[str, t.Any]] = [
        {"name": "command-true", "ansible.builtin.command": {"argv": ["true"]}, "changed_when": False},
    ]
    for step, extra in (("create", {}), ("remove", {"state": "absent"})):
        tasks += [
            {"name": step, MODULE: dict(args, **extra), "register": "result"},
            {"name": "save", "ansible.builtin.copy": {"content": "{{ result | to_json }}", "dest": str(results[step])}},
        ]
    start = observer.mark()
    rows = timed_play(tasks, work, f"live-{method}-{rnd}")
    end = observer.mark()
    wall = {row["task"]: row["seconds"] * 1000 for row in rows}
    create, remove = (json.loads(results[step].read_text()) for step in ("create", "remove"))
    if not (create["changed"] and remove["changed"]):
        raise RuntimeError(f"{method} round {rnd} did not create and remove a snapshot: {create} {remove}")
    return {
        "downtime": create["downtime_ms"],
        "elapsed": create["elapsed_ms"],
        "frozen": create["frozen_ms"],
        "wall": wall["create"],
        "baseline": wall["command-true"],
        "remove_wall": wall["remove"],
        "remove_downtime": remove["downtime_ms"],
        "observed": observer.pause_ms(start, end),
    }


def hmp(qmp: t.Any, command: str) -> str:
    reply = str(qmp.execute("human-monitor-command", {"command-line": command}, timeout=600))
    if reply.strip():  # savevm and delvm print nothing unless they fail; errors are text, never QMP errors
        raise RuntimeError(f"HMP {command} failed: {reply.strip()}")
    return reply


def hmp_round(vm: t.Any, rnd: str, observer: EventObserver) -> dict[str, t.Any]:
    """Raw HMP savevm over the VM's QMP socket, its pause from STOP/RESUME exactly as the module computes it."""
    tag = f"bench-hmp-{rnd}"
    start = observer.mark()
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
    vmstate_mib = snapshot_vmstate_mib(vm, tag)
    remove_started = time.perf_counter()
    with _qmp.QmpClient(str(vm.qmp_socket), 5.0, 600.0) as qmp:
        hmp(qmp, f'delvm "{tag}"')
    remove_wall = (time.perf_counter() - remove_started) * 1000
    end = observer.mark()
    return {
        "downtime": _qmp.pause_ms(events),
        "elapsed": elapsed,
        "frozen": None,
        "wall": wall,
        "baseline": None,
        "remove_wall": remove_wall,
        "remove_downtime": 0.0,
        "observed": observer.pause_ms(start, end),
        "vmstate_mib": vmstate_mib,
    }


def snapshot_vmstate_mib(vm: t.Any, tag: str) -> float:
    with _qmp.QmpClient(str(vm.qmp_socket), 5.0, 60.0) as qmp:
        for node in qmp.execute("query-named-block-nodes") or []:
            for snap in (node.get("image") or {}).get("snapshots") or []:
                if snap.get("name") == tag:
                    return float(snap.get("vm-state-size", 0)) / 2**20
    return 0.0


def median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def spread(values: list[float | None], digits: int = 1) -> str:
    present = [value for value in values if value is not None]
    if not present:
        return "-"
    mid = statistics.median(present)
    return f"{mid:.{digits}f} ({min(present):.{digits}f}-{max(present):.{digits}f})"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def report(samples: dict[str, list[dict[str, t.Any]]], fill_out: str) -> None:
    def column(method: str, key: str) -> list[t.Any]:
        return [sample[key] for sample in samples[method]]

    def mid(method: str, key: str) -> float:
        return median(column(method, key)) or 0.0

    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True)
    core = subprocess.run(
        [str(Path(sys.executable).parent / "ansible"), "--version"], capture_output=True, text=True, check=True
    )
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine()}")
    print(
        f"tools: {qemu.stdout.splitlines()[0]} (TCG); {core.stdout.splitlines()[0]}; Python {platform.python_version()}"
    )
    print(
        f"guest: tiny guest of tests/vm, {GUEST_MIB} MiB RAM, {TOUCHED_MIB} MiB of it random data in a tmpfs, idle; "
        f"one 64 MiB ext4 qcow2 disk; HMP savevm vm-state-size {median(column(HMP, 'vmstate_mib')):.0f} MiB; "
        f"1 warm-up round + {ROUNDS} rounds, methods in rotating and alternating order, host `sync` before each; "
        "medians (min-max)"
    )
    print()
    print(
        "| method | downtime_ms | pause seen by a 2nd QMP monitor | elapsed_ms | frozen_ms | task wall time "
        "| wall minus `command: true` | removal wall time | pause vs HMP savevm |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    hmp_pause = mid(HMP, "downtime")
    for method, label in METHODS.items():
        if method == HMP:
            wall, own = f"{spread(column(method, 'wall'), 0)} ms (QMP client in-process)", "-"
        else:
            wall = f"{spread(column(method, 'wall'), 0)} ms"
            own = f"{spread([s['wall'] - s['baseline'] for s in samples[method]], 0)} ms"
        print(
            f"| {label} | {spread(column(method, 'downtime'))} | {spread(column(method, 'observed'))} "
            f"| {spread(column(method, 'elapsed'))} | {spread(column(method, 'frozen'))} | {wall} | {own} "
            f"| {spread(column(method, 'remove_wall'), 0)} ms | **{mid(method, 'downtime') / hmp_pause:.2f}x** |"
        )
    baseline = median([value for method in METHODS for value in column(method, "baseline")])
    print(f"| `command: true` task (Ansible's fixed cost per task) | | | | | {baseline:.0f} ms | | | |")
    print()
    paired = [m["downtime"] / h["downtime"] for m, h in zip(samples["vmstate"], samples[HMP])]
    print("| ratio / target | value | target | met |")
    print("|---|---|---|---|")
    print(
        f"| internal + vmstate pause vs HMP savevm pause (medians) | {mid('vmstate', 'downtime'):.0f} ms vs "
        f"{hmp_pause:.0f} ms = **{mid('vmstate', 'downtime') / hmp_pause:.2f}x** "
        f"(round by round {min(paired):.2f}x-{max(paired):.2f}x) | - | - |"
    )
    print(
        f"| internal + vmstate elapsed_ms vs HMP savevm command time | {mid('vmstate', 'elapsed'):.0f} ms vs "
        f"{mid(HMP, 'elapsed'):.0f} ms = **{mid('vmstate', 'elapsed') / mid(HMP, 'elapsed'):.2f}x** | - | - |"
    )
    for method in ("disk-only", "external"):
        worst, worst_elapsed = max(column(method, "downtime")), max(column(method, "elapsed"))
        print(
            f"| {method}: guest pause, worst round: downtime_ms / elapsed_ms (bounds the I/O drain) "
            f"| {worst:.1f} ms / {worst_elapsed:.1f} ms | <= 10 ms "
            f"| {'yes' if worst <= 10 else 'no'} / {'yes' if worst_elapsed <= 10 else 'no'} |"
        )
    worst_frozen = max(column("external-quiesce", "frozen"))
    print(
        f"| external-quiesce: guest file-system writes blocked (frozen_ms), worst round | {worst_frozen:.1f} ms "
        f"(downtime_ms {max(column('external-quiesce', 'downtime')):.1f} ms) | - | - |"
    )
    print(f"guest fill:\n{fill_out.strip()}", file=sys.stderr)
    print("raw samples:", json.dumps(samples), file=sys.stderr)


def main() -> int:
    cache = tiny_guest.default_cache_dir()
    samples: dict[str, list[dict[str, t.Any]]] = {method: [] for method in METHODS}
    observer = None
    # Short path: AF_UNIX socket paths are limited to 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="vmsnap-live-", dir=os.environ.get("BENCH_DIR")))
    try:
        image = tiny_guest.build_tiny_guest(cache)
        disk = tiny_guest.make_ext4_qcow2(work / "data.qcow2", size_mib=64)
        monitor = work / "vm" / "observer.sock"
        extra = ["-qmp", f"unix:{monitor},server=on,wait=off"]
        with tiny_guest.GuestVM(image, [disk], work / "vm", memory_mib=GUEST_MIB, extra_args=extra) as vm:
            vm.wait_ready(BOOT_TIMEOUT)
            print(f"guest up (QEMU pid {vm.pid}); filling {TOUCHED_MIB} MiB of its RAM", file=sys.stderr)
            fill_out = fill_guest_ram(vm)
            observer = EventObserver(monitor)
            order = list(METHODS)
            # One untimed round first: the first vmstate written into a fresh qcow2 also grows the file.
            for index, rnd in enumerate(["warm-up", *map(str, range(ROUNDS))]):
                shift = (index - 1) % len(order) if index else 0
                ordered = order[shift:] + order[:shift]
                # Reversed every other round, so no method always follows the same one.
                for method in ordered[::-1] if index % 2 == 0 and index else ordered:
                    # The vmstate of the step before (~600 MiB) must not be written back during this one.
                    os.sync()
                    if method == HMP:
                        sample = hmp_round(vm, rnd, observer)
                    else:
                        sample = module_round(vm, method, rnd, work, observer)
                    if rnd != "warm-up":
                        samples[method].append(sample)
                    print(f"round {rnd} {method}: {sample}", file=sys.stderr)
            observer.close()
            observer = None
        report(samples, fill_out)
        return 0
    finally:
        if observer is not None:
            observer.close()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(COLLECTIONS, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
