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
import json
import os
import platform
import statistics
import sys
import typing as t
from pathlib import Path

from _guest_bench import (
    COMMAND_TRUE,
    HMP,
    BenchGuest,
    Monitor,
    cpu_model,
    hmp_round,
    private_collections,
    run_rounds,
    spread,
    tool_versions,
    workspace,
)
from _timing import timed_play

ROUNDS = int(os.environ.get("BENCH_LIVE_ROUNDS", "5"))
GUEST_MIB = int(os.environ.get("BENCH_LIVE_GUEST_MIB", "768"))
TOUCHED_MIB = int(os.environ.get("BENCH_LIVE_TOUCHED_MIB", "512"))
MODULE = "vmsnap.qemu.qmp_live_snapshot"
# method -> label in the tables; HMP savevm is run by this script itself, the others through the module.
METHODS = {
    "vmstate": "qmp_live_snapshot internal + vmstate (`snapshot-save`)",
    "disk-only": "qmp_live_snapshot internal disk-only (`vmstate: false`)",
    "external": "qmp_live_snapshot external",
    "external-quiesce": "qmp_live_snapshot external, `quiesce: required`",
    HMP: "HMP `savevm` over QMP (raw, the seed's method)",
}

# The collection copy that `make copy` makes, copied once more into a private folder.
COLLECTIONS = private_collections("vmsnap-live-collections-")
# The keys of a checkpoint's figures, in the order of module_round() (HMP savevm adds vmstate_mib).
SAMPLE = ("downtime", "elapsed", "frozen", "wall", "baseline", "remove_wall", "remove_downtime", "observed")


def module_round(vm: t.Any, method: str, rnd: str, work: Path, observer: Monitor) -> dict[str, t.Any]:
    """One play: command: true, the snapshot, its removal. Returns the figures of this checkpoint."""
    args: dict[str, t.Any] = {"socket": str(vm.qmp_socket), "name": f"bench-{method}-{rnd}"}
    if method == "disk-only":
        args["vmstate"] = False
    elif method.startswith("external"):
        args["mode"] = "external"
    if method == "external-quiesce":
        args.update(quiesce="required", guest_agent_socket=str(vm.qga_socket))
    results = {step: work / f"{method}-{rnd}-{step}.json" for step in ("create", "remove")}
    tasks: list[dict[str, t.Any]] = [dict(COMMAND_TRUE)]
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


def hmp_sample(vm: t.Any, rnd: str, observer: Monitor) -> dict[str, t.Any]:
    """hmp_round(), the pause seen by the observer until after the delvm, vm-state-size in MiB (0 if none)."""
    sample = hmp_round(
        vm, rnd, observer, size_key="vmstate_mib", size_unit=2**20, size_missing=0.0, observe_removal=True
    )
    return {key: sample.get(key) for key in (*SAMPLE, "vmstate_mib")}


def median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def report(samples: dict[str, list[dict[str, t.Any]]], fill_out: str) -> None:
    def column(method: str, key: str) -> list[t.Any]:
        return [sample[key] for sample in samples[method]]

    def mid(method: str, key: str) -> float:
        return median(column(method, key)) or 0.0

    qemu, core = tool_versions()
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine()}")
    print(f"tools: {qemu} (TCG); {core}; Python {platform.python_version()}")
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
    with workspace("vmsnap-live-", COLLECTIONS) as work:
        bench = BenchGuest(work, GUEST_MIB)
        with bench.booted(TOUCHED_MIB, 900, quiet=False, then=" && df -m /fill && free -m") as (vm, fill, observer):
            # One untimed round first: the first vmstate written into a fresh qcow2 also grows the file.
            samples = run_rounds(
                METHODS,
                ROUNDS,
                lambda rnd, method: module_round(vm, method, rnd, work, observer),
                lambda rnd: hmp_sample(vm, rnd, observer),
                first=0,
                repeat_first=True,
                show=str,
            )[0]
        report(samples, fill["output"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
