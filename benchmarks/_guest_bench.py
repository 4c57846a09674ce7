# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Shared by the benchmarks that run the tiny guest of tests/vm (live_pause.py, ram_checkpoint.py): the private
collection copy and work folder, the guest booted with its RAM filled and a second QMP monitor on it, raw HMP
savevm, the warm-up and rotating rounds, and the machine/tool lines and figures of the reports."""

from __future__ import annotations

import contextlib
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
import types
import typing as t
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIB = 2**20
BOOT_TIMEOUT = 120.0
HMP = "hmp-savevm"  # the method name of raw HMP savevm (hmp_round()) in run_rounds()
# Ansible's fixed cost per task, played before the timed task.
COMMAND_TRUE: dict[str, t.Any] = {
    "name": "command-true",
    "ansible.builtin.command": {"argv": ["true"]},
    "changed_when": False,
}

sys.path.insert(0, str(REPO / "tests" / "vm"))
tiny_guest = importlib.import_module("tiny_guest")


def private_collections(prefix: str) -> Path:
    """The collection copy that `make copy` made, copied once more into a private folder (returned, to remove at
    the end) and made the one Ansible and this process use: a `make copy` elsewhere during the run (it deletes and
    rebuilds build/src) must not pull the modules away between plays."""
    source = Path((os.environ.get("ANSIBLE_COLLECTIONS_PATH") or str(REPO / "build" / "src")).split(os.pathsep)[0])
    collections = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.copytree(source / "ansible_collections" / "vmsnap" / "qemu", collections / "ansible_collections/vmsnap/qemu")
    os.environ["ANSIBLE_COLLECTIONS_PATH"] = str(collections)
    sys.path.insert(0, str(collections))
    return collections


@contextlib.contextmanager
def workspace(prefix: str, collections: Path) -> t.Iterator[Path]:
    """A work folder in $BENCH_DIR (or the temp folder); at the end removed with the private collection copy."""
    # Short path: AF_UNIX socket paths are limited to 107 bytes.
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("BENCH_DIR")))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(collections, ignore_errors=True)


def qmp_utils() -> types.ModuleType:
    """The pause_ms() and QMP client the modules themselves run, from the copy of private_collections()."""
    return importlib.import_module("ansible_collections.vmsnap.qemu.plugins.module_utils._qmp")


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
        return float(qmp_utils().pause_ms(events))

    def stops(self, start: int, end: int) -> int:
        with self._cond:
            return sum(1 for e in self.events[start:end] if e["event"] == "STOP")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def guest(vm: t.Any, command: str, timeout: float = 60.0) -> str:
    rc, out = vm.run(command, timeout=timeout)
    if rc != 0:
        raise RuntimeError(f"{command!r} failed in the guest ({rc}): {out}")
    return str(out)


def fill_guest_ram(vm: t.Any, mib: int, timeout: float, quiet: bool = True, then: str = "") -> dict[str, t.Any]:
    """mib MiB of random data in /fill/ram, a tmpfs of its own (/run is only half the RAM), so that no method can
    skip zero pages; dd's statistics unless quiet, and the output of the shell commands `then` appends. Returns
    the output, the seconds the fill took and the file's tmpfs blocks (KiB); raises if they are fewer."""
    started = time.perf_counter()
    out = guest(
        vm,
        f"mkdir -p /fill && mount -t tmpfs -o size={mib + 64}m tmpfs /fill && "
        f"dd if=/dev/urandom of=/fill/ram bs=1M count={mib}{' 2>/dev/null' if quiet else ''} && sync{then}",
        timeout=timeout,
    )
    seconds = time.perf_counter() - started
    used_kib = int(guest(vm, "du -k /fill/ram").split()[0])  # tmpfs blocks: pages that exist
    if used_kib < mib * 1024:
        raise RuntimeError(f"/fill/ram does not hold {mib} MiB of RAM: du {used_kib} KiB")
    return {"output": out, "seconds": seconds, "tmpfs_kib": used_kib}


class BenchGuest:
    """The tiny guest of tests/vm with memory_mib of RAM, one 64 MiB ext4 qcow2 disk and a second QMP monitor
    socket (for Monitor), all in work."""

    def __init__(self, work: Path, memory_mib: int) -> None:
        self.work = work
        self.memory_mib = memory_mib
        self.image = tiny_guest.build_tiny_guest(tiny_guest.default_cache_dir())
        self.disk = tiny_guest.make_ext4_qcow2(work / "data.qcow2", size_mib=64)
        self.monitor_socket = work / "vm" / "observer.sock"
        self.extra_args = ["-qmp", f"unix:{self.monitor_socket},server=on,wait=off"]

    def vm(self, *extra_args: str) -> t.Any:
        """A GuestVM, not started yet, with this command line and extra_args."""
        return tiny_guest.GuestVM(
            self.image,
            [self.disk],
            self.work / "vm",
            memory_mib=self.memory_mib,
            extra_args=[*self.extra_args, *extra_args],
        )

    @contextlib.contextmanager
    def booted(
        self, fill_mib: int, fill_timeout: float, quiet: bool = True, then: str = ""
    ) -> t.Iterator[tuple[t.Any, dict[str, t.Any], Monitor]]:
        """The VM, started and ready, with fill_mib of its RAM filled by fill_guest_ram() (what that returns), and
        then a Monitor on it; the Monitor closed and the VM killed at the end."""
        with self.vm() as vm:
            vm.wait_ready(BOOT_TIMEOUT)
            print(f"guest up (QEMU pid {vm.pid}); filling {fill_mib} MiB of its RAM", file=sys.stderr)
            fill = fill_guest_ram(vm, fill_mib, fill_timeout, quiet, then)
            with Monitor(self.monitor_socket) as monitor:
                yield vm, fill, monitor


def hmp(qmp: t.Any, command: str) -> str:
    reply = str(qmp.execute("human-monitor-command", {"command-line": command}, timeout=600))
    if reply.strip():  # savevm and delvm print nothing unless they fail; errors are text, never QMP errors
        raise RuntimeError(f"HMP {command} failed: {reply.strip()}")
    return reply


def snapshot_vmstate_size(monitor: Monitor, tag: str, unit: int = 1, missing: float | None = None) -> float | None:
    """The vm-state-size of the internal snapshot tag: bytes (an int) with unit 1, else a float in units of unit."""
    for node in monitor.command("query-named-block-nodes") or []:
        for snap in (node.get("image") or {}).get("snapshots") or []:
            if snap.get("name") == tag:
                size = int(snap.get("vm-state-size", 0))
                return size if unit == 1 else size / unit
    return missing


def hmp_round(
    vm: t.Any,
    rnd: str,
    monitor: Monitor,
    size_key: str = "state_bytes",
    size_unit: int = 1,
    size_missing: float | None = None,
    observe_removal: bool = False,
) -> dict[str, t.Any]:
    """Raw HMP savevm over the VM's QMP socket, its pause from STOP/RESUME exactly as the module computes it, then
    its size (snapshot_vmstate_size() as size_key) and its removal with delvm. The monitor's window (observed,
    stops) ends after the savevm, or after the delvm with observe_removal."""
    _qmp = qmp_utils()
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
    end = None if observe_removal else monitor.mark()
    size = snapshot_vmstate_size(monitor, tag, size_unit, size_missing)
    remove_started = time.perf_counter()
    with _qmp.QmpClient(str(vm.qmp_socket), 5.0, 600.0) as qmp:
        hmp(qmp, f'delvm "{tag}"')
    remove_wall = (time.perf_counter() - remove_started) * 1000
    if end is None:
        end = monitor.mark()
    return {
        "downtime": _qmp.pause_ms(events),
        "elapsed": elapsed,
        "wall": wall,
        "baseline": None,
        "observed": monitor.pause_ms(start, end),
        "stops": monitor.stops(start, end),
        size_key: size,
        "remove_wall": remove_wall,
        "remove_downtime": 0.0,
    }


def run_rounds(
    methods: t.Iterable[str],
    count: int,
    module_step: t.Callable[[str, str], dict[str, t.Any]],
    hmp_step: t.Callable[[str], dict[str, t.Any]],
    first: int = 1,
    repeat_first: bool = False,
    show: t.Callable[[dict[str, t.Any]], str] = json.dumps,
    after_warm_up: t.Callable[[], None] | None = None,
) -> tuple[dict[str, list[dict[str, t.Any]]], dict[str, dict[str, t.Any]], list[list[str]]]:
    """One untimed warm-up round, then count rounds named from first. Each round runs every method, in an order that
    rotates and is reversed every other round, so that no method always follows the same one (with repeat_first, the
    first counted round has the warm-up's order); before each step a host `sync`: the state written by the step
    before must not be written back during this one. A step is hmp_step(round) for HMP, else module_step(round,
    method); its sample goes to stderr through show. Returns the counted samples by method, the warm-up's samples
    and every round's order."""
    order = list(methods)
    samples: dict[str, list[dict[str, t.Any]]] = {method: [] for method in order}
    warmup: dict[str, dict[str, t.Any]] = {}
    orders: list[list[str]] = []
    for index, rnd in enumerate(["warm-up", *map(str, range(first, first + count))]):
        turn = max(index - 1, 0) if repeat_first else index
        shift = turn % len(order)
        ordered = order[shift:] + order[:shift]
        ordered = ordered[::-1] if turn % 2 else ordered
        orders.append(ordered)
        for method in ordered:
            os.sync()
            sample = hmp_step(rnd) if method == HMP else module_step(rnd, method)
            if rnd == "warm-up":
                warmup[method] = sample
            else:
                samples[method].append(sample)
            print(f"round {rnd} {method}: {show(sample)}", file=sys.stderr)
        if rnd == "warm-up" and after_warm_up is not None:
            after_warm_up()
    return samples, warmup, orders


def spread(values: t.Sequence[float | None], digits: int = 1, count: bool = False) -> str:
    """Median (min-max) of the values that are not None, with `; n=N` inside the brackets if count."""
    present = [value for value in values if value is not None]
    if not present:
        return "-"
    n = f"; n={len(present)}" if count else ""
    return f"{statistics.median(present):.{digits}f} ({min(present):.{digits}f}-{max(present):.{digits}f}{n})"


def cpu_model() -> str:
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )


def tool_versions() -> tuple[str, str]:
    """The first lines of `qemu-system-x86_64 --version` and of this venv's `ansible --version`."""
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True)
    core = subprocess.run(
        [str(Path(sys.executable).parent / "ansible"), "--version"], capture_output=True, text=True, check=True
    )
    return qemu.stdout.splitlines()[0], core.stdout.splitlines()[0]
