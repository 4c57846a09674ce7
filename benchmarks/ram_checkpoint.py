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
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import typing as t
from pathlib import Path

from _guest_bench import (
    COMMAND_TRUE,
    HMP,
    MIB,
    BenchGuest,
    Monitor,
    cpu_model,
    guest,
    hmp_round,
    private_collections,
    qmp_utils,
    run_rounds,
    snapshot_vmstate_size,
    tool_versions,
    workspace,
)
from _guest_bench import spread as spread_of
from _timing import timed_play

ROUNDS = int(os.environ.get("BENCH_RAM_ROUNDS", "5"))
RESTORES = int(os.environ.get("BENCH_RAM_RESTORES", "3"))  # per page-cache state (warm, cold)
GUEST_MIB = int(os.environ.get("BENCH_RAM_GUEST_MIB", "1536"))
FILL_MIB = int(os.environ.get("BENCH_RAM_FILL_MIB", "1024"))
TARGET = 50.0  # HMP savevm pause / external-with-RAM pause
LIVE = "vmsnap.qemu.qmp_live_snapshot"
STATE = "vmsnap.qemu.qmp_vm_state"
EXTERNAL, INTERNAL = "external", "internal"
METHODS = {
    EXTERNAL: "qmp_live_snapshot external + vmstate (background-snapshot)",
    INTERNAL: "qmp_live_snapshot internal + vmstate (`snapshot-save`)",
    HMP: "HMP `savevm` over QMP (raw)",
}

# The collection copy that `make copy` made, copied once more into a private folder.
COLLECTIONS = private_collections("vmsnap-ram-collections-")
_qmp = qmp_utils()  # the QMP client the modules themselves run


def meminfo_kib(vm: t.Any) -> dict[str, int]:
    fields = {}
    for line in guest(vm, "cat /proc/meminfo").splitlines():
        name, dummy, rest = line.partition(":")
        if rest.strip():
            fields[name.strip()] = int(rest.split()[0])
    return fields


def checked_fill(vm: t.Any, fill: dict[str, t.Any]) -> dict[str, t.Any]:
    """fill_guest_ram()'s figures for FILL_MIB with df and meminfo, once Shmem says that RAM really holds the data."""
    info = meminfo_kib(vm)
    if info.get("Shmem", 0) < FILL_MIB * 1024:
        raise RuntimeError(f"/fill/ram does not hold {FILL_MIB} MiB of RAM: meminfo {info}")
    return dict(fill, df=guest(vm, "df -k /fill").strip(), meminfo=info)


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


def module_round(vm: t.Any, method: str, rnd: str, work: Path, monitor: Monitor) -> dict[str, t.Any]:
    """Play 1: command: true, the checkpoint. Then its size. Play 2: its removal (state=absent)."""
    name = f"bench-{method}-{rnd}"
    args: dict[str, t.Any] = {"socket": str(vm.qmp_socket), "name": name}
    if method == EXTERNAL:
        args.update(mode="external", vmstate=True)
    created, removed = work / f"{method}-{rnd}-create.json", work / f"{method}-{rnd}-remove.json"
    tasks = [dict(COMMAND_TRUE)]
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
        sample["state_bytes"] = snapshot_vmstate_size(monitor, name)
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


def restore_sample(bench: BenchGuest, kept: Path, state: Path, index: int, cold: bool, md5: str) -> dict[str, t.Any]:
    """A fresh QEMU with -incoming defer, qmp_vm_state state=restored, until the guest's shell answers."""
    subprocess.run(["cp", "--sparse=always", str(kept), str(bench.disk)], check=True)  # the disk as at the save
    os.sync()
    if cold:
        drop_from_page_cache(state)
    vm = bench.vm("-incoming", "defer")
    work = bench.work
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
    return spread_of(numbers, digits, count=True)


def every(numbers: list[float], digits: int = 1) -> str:
    return ", ".join(f"{value:.{digits}f}" for value in numbers) or "-"


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f} MiB"


def machine() -> list[str]:
    qemu, core = tool_versions()
    date = subprocess.run(["date"], capture_output=True, text=True, check=True).stdout.strip()
    return [
        f"date: {date} ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        f"machine: {cpu_model()}, nproc {os.cpu_count()}, {platform.system()} {platform.release()}, "
        f"load average at the end {os.getloadavg()[0]:.2f}",
        f"tools: {qemu}, TCG (no KVM); {core}; Python {platform.python_version()}",
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
    huge: dict[str, int | None] = {}
    with workspace("vmsnap-ram-", COLLECTIONS) as work:
        bench = BenchGuest(work, GUEST_MIB)
        with bench.booted(FILL_MIB, 1800) as (vm, filled, monitor):
            fill = checked_fill(vm, filled)
            print(f"filled in {fill['seconds']:.0f} s: {fill['df']}", file=sys.stderr)
            huge["before"] = anon_huge_kib(vm.pid)
            samples, warmup, orders = run_rounds(
                METHODS,
                ROUNDS,
                lambda rnd, method: module_round(vm, method, rnd, work, monitor),
                lambda rnd: hmp_round(vm, rnd, monitor),
                after_warm_up=lambda: huge.update({"after-warm-up": anon_huge_kib(vm.pid)}),
            )
            huge["end"] = anon_huge_kib(vm.pid)
            os.sync()
            saved = save_for_restore(vm, work, monitor)
            print(f"saved for the restores: {saved}", file=sys.stderr)
        restores: list[dict[str, t.Any]] = []
        state = t.cast(Path, saved["state"])
        sha = {"warm": 0.0, "cold": 0.0}
        if state.exists():
            kept = work / "data.qcow2.at-save"
            subprocess.run(["cp", "--sparse=always", str(bench.disk), str(kept)], check=True)
            sha["warm"] = sha256_seconds(state)
            drop_from_page_cache(state)
            sha["cold"] = sha256_seconds(state)
            for index in range(2 * RESTORES):
                sample = restore_sample(bench, kept, state, index, index % 2 == 1, saved["md5"])
                restores.append(sample)
                print(f"restore {index}: {sample}", file=sys.stderr)
        report(samples, warmup, orders, fill, huge, saved, restores, sha, time.perf_counter() - began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
