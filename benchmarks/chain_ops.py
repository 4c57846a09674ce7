#!/usr/bin/env python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark: qcow2_chain committed/flattened on a 1 GiB chain against raw qemu-img commit/convert.

Each round builds identical chains (1 GiB base with 768 MiB of data, overlay rewriting 512 MiB of it) and
runs, in the same run: the module's committed, flattened (with and without verify), a `command: true`
task (Ansible's fixed cost per task), and raw `qemu-img commit -d` / `qemu-img convert -O qcow2` + rename
on their own copies. Prints a Markdown table for docs/performance.md. Not a test: it asserts nothing.

Usage (from the repo root, after `make deps copy`):  make bench   [BENCH_ROUNDS=3]
"""

from __future__ import annotations

import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _timing import timed_play

HERE = Path(__file__).resolve().parent
ROUNDS = int(os.environ.get("BENCH_CHAIN_ROUNDS", os.environ.get("BENCH_ROUNDS", "3")))
CASES = ["module-commit", "raw-commit", "module-flatten", "module-flatten-noverify", "raw-flatten", "raw-flatten-sync"]
SYNC_TASK = {"name": "sync", "ansible.builtin.command": {"argv": ["sync"]}, "changed_when": False}


def run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def make_chain(folder: Path, name: str) -> tuple[str, str]:
    base, top = folder / f"{name}-base.qcow2", folder / f"{name}-top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1G"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 768M", str(base)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xbb 256M 512M", str(top)])
    return str(base), str(top)


def timed(argv_list: list[list[str]]) -> float:
    started = time.perf_counter()
    for argv in argv_list:
        run(argv)
    return time.perf_counter() - started


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vmsnap-chain-bench-", dir=os.environ.get("BENCH_DIR")))
    samples: dict[str, list[float]] = {case: [] for case in CASES + ["command-true"]}
    try:
        for rnd in range(ROUNDS):
            chains = {case: make_chain(work, f"{case}-{rnd}") for case in CASES}
            tasks = [
                {"name": f"command-true-{rnd}", "ansible.builtin.command": {"argv": ["true"]}, "changed_when": False},
                # The module's own fixed cost: a flatten of an image that has no backing file does nothing.
                {
                    "name": "module-noop",
                    "vmsnap.qemu.qcow2_chain": {"path": chains["module-commit"][0], "state": "flattened"},
                },
            ]
            for case, extra in (
                ("module-commit", {"state": "committed"}),
                ("module-flatten", {"state": "flattened"}),
                ("module-flatten-noverify", {"state": "flattened", "verify": False}),
            ):
                tasks.append(SYNC_TASK)
                tasks.append({"name": case, "vmsnap.qemu.qcow2_chain": dict(path=chains[case][1], **extra)})
            for row in timed_play(tasks, work, f"bench-{rnd}"):
                if row["task"] != "sync":
                    key = "command-true" if row["task"].startswith("command-true") else row["task"]
                    samples.setdefault(key, [])
                    samples[key].append(row["seconds"])
            run(["sync"])
            base, top = chains["raw-commit"]
            samples["raw-commit"].append(timed([["qemu-img", "commit", "-q", "-d", top], ["rm", "-f", top]]))
            run(["sync"])
            base, top = chains["raw-flatten"]
            samples["raw-flatten"].append(
                timed([["qemu-img", "convert", "-q", "-O", "qcow2", top, top + ".new"], ["mv", top + ".new", top]])
            )
            run(["sync"])
            base, top = chains["raw-flatten-sync"]
            convert = ["qemu-img", "convert", "-q", "-O", "qcow2", top, top + ".new"]
            samples["raw-flatten-sync"].append(timed([convert, ["sync", top + ".new"], ["mv", top + ".new", top]]))
            for path in work.glob(f"*-{rnd}-*"):
                path.unlink()
        med = {case: statistics.median(values) for case, values in samples.items()}
        fixed = med["command-true"]
        print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {ROUNDS} rounds, medians")
        print()
        noop = med["module-noop"]
        print(
            "| operation | task wall time | minus `command: true` | minus module no-op | raw qemu-img "
            "| ratio (minus `command: true`) | ratio (minus module no-op) |"
        )
        print("|---|---|---|---|---|---|---|")
        for case, raw in (
            ("module-commit", "raw-commit"),
            ("module-flatten", "raw-flatten"),
            ("module-flatten", "raw-flatten-sync"),
            ("module-flatten-noverify", "raw-flatten"),
            ("module-flatten-noverify", "raw-flatten-sync"),
        ):
            work_time, own_time = med[case] - fixed, med[case] - noop
            print(
                f"| {case} vs {raw} | {med[case] * 1000:.0f} ms | {work_time * 1000:.0f} ms | {own_time * 1000:.0f} ms "
                f"| {med[raw] * 1000:.0f} ms | **{work_time / med[raw]:.2f}x** | **{own_time / med[raw]:.2f}x** |"
            )
        print(f"| `command: true` task | {fixed * 1000:.0f} ms | | | | | |")
        print(f"| qcow2_chain no-op task | {noop * 1000:.0f} ms | | | | | |")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
