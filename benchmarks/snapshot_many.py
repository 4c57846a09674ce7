#!/usr/bin/env python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark: qcow2_snapshot over 1 and 50 images against a raw qemu-img loop and a `command: true` task.

Everything runs in the same invocation, interleaved round by round, so the ratios compare like with like on a
noisy machine. Prints a Markdown table for docs/performance.md. Not a test: it asserts nothing.

Usage (from the repo root, after `make deps copy`):  make bench   [BENCH_ROUNDS=7] [BENCH_IMAGES=50]
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _timing import timed_play

HERE = Path(__file__).resolve().parent
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
IMAGES = int(os.environ.get("BENCH_IMAGES", "50"))


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kwargs)


def make_images(folder: Path, count: int, prefix: str) -> list[str]:
    paths = []
    for index in range(count):
        path = folder / f"{prefix}-{index:03d}.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"])
        paths.append(str(path))
    return paths


def playbook(single: str, many: list[str], looped: list[str]) -> list[dict]:
    """The tasks of the timed play, round by round."""
    tasks: list[dict] = []
    for rnd in range(ROUNDS):
        tasks += [
            {"name": f"command-true-{rnd}", "ansible.builtin.command": {"argv": ["true"]}, "changed_when": False},
            {"name": f"one-{rnd}", "vmsnap.qemu.qcow2_snapshot": {"path": single, "name": f"bench-{rnd}"}},
            {"name": f"many-{rnd}", "vmsnap.qemu.qcow2_snapshot": {"paths": many, "name": f"bench-{rnd}"}},
        ]
    tasks.append(
        {
            "name": "loop-of-tasks",
            "vmsnap.qemu.qcow2_snapshot": {"path": "{{ item }}", "name": "bench-loop"},
            "loop": looped,
        }
    )
    return tasks


def raw_loop_seconds(paths: list[str], name: str) -> float:
    script = 'for f in "$@"; do qemu-img snapshot -c "$0" "$f" || exit 1; done'
    started = datetime.datetime.now()
    subprocess.run(["bash", "-c", script, name] + paths, check=True)
    return (datetime.datetime.now() - started).total_seconds()


def raw_parallel_seconds(paths: list[str], name: str, jobs: int) -> float:
    started = datetime.datetime.now()
    subprocess.run(
        ["xargs", "-0", "-P", str(jobs), "-n", "1", "qemu-img", "snapshot", "-c", name],
        input="\0".join(paths),
        text=True,
        check=True,
    )
    return (datetime.datetime.now() - started).total_seconds()


def main() -> int:
    bin_dir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="vmsnap-bench-"))
    try:
        single = make_images(work, 1, "single")[0]
        many = make_images(work, IMAGES, "many")
        looped = make_images(work, IMAGES, "looped")
        raw = make_images(work, IMAGES, "raw")
        jobs = max(2, min(8, os.cpu_count() or 1))  # what the module uses (_qemu_img.MAX_PARALLEL)
        rows = timed_play(playbook(single, many, looped), work, "bench")
        raw_runs = [raw_loop_seconds(raw, f"raw-{rnd}") for rnd in range(ROUNDS)]
        raw_parallel_runs = [raw_parallel_seconds(raw, f"raw-parallel-{rnd}", jobs) for rnd in range(ROUNDS)]

        def median(prefix: str) -> float:
            return statistics.median(row["seconds"] for row in rows if row["task"].startswith(prefix))

        cmd, one, fifty = median("command-true-"), median("one-"), median("many-")
        loop = median("loop-of-tasks")
        raw_total = statistics.median(raw_runs)
        per_disk = (fifty - one) / (IMAGES - 1)
        raw_per_disk = raw_total / IMAGES
        raw_parallel_per_disk = statistics.median(raw_parallel_runs) / IMAGES
        qemu = run(["qemu-img", "--version"]).stdout.splitlines()[0]
        core = run([str(bin_dir / "ansible"), "--version"]).stdout.splitlines()[0]
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in line
            ),
            platform.processor(),
        )
        print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
        print(f"machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}")
        print(f"tools: {qemu}; {core}; Python {platform.python_version()}; {ROUNDS} rounds, medians, {IMAGES} images")
        print()
        print("| measurement | median |")
        print("|---|---|")
        print(f"| `command: true` task | {cmd * 1000:.0f} ms |")
        print(f"| qcow2_snapshot, 1 image | {one * 1000:.0f} ms |")
        print(f"| qcow2_snapshot, {IMAGES} images in one task (`paths`) | {fifty * 1000:.0f} ms |")
        print(f"| raw `qemu-img snapshot -c` shell loop, {IMAGES} images | {raw_total * 1000:.0f} ms |")
        print(
            f"| raw `qemu-img snapshot -c`, {jobs} at a time (xargs -P), {IMAGES} images "
            f"| {raw_parallel_per_disk * IMAGES * 1000:.0f} ms |"
        )
        print(f"| loop of {IMAGES} qcow2_snapshot tasks (`loop:`), once | {loop * 1000:.0f} ms |")
        print()
        print("| ratio | value | target |")
        print("|---|---|---|")
        per_disk_ratio = per_disk / raw_per_disk
        print(
            f"| per-disk cost: (({IMAGES}-image task) - (1-image task)) / {IMAGES - 1} vs raw per-disk "
            f"| {per_disk * 1000:.1f} ms vs {raw_per_disk * 1000:.1f} ms = **{per_disk_ratio:.2f}x** | <= 1.5x |"
        )
        print(
            f"| per-disk cost vs raw qemu-img run {jobs} at a time, as the module does "
            f"| {per_disk * 1000:.1f} ms vs {raw_parallel_per_disk * 1000:.1f} ms "
            f"= **{per_disk / raw_parallel_per_disk:.2f}x** | (like for like) |"
        )
        print(f"| fixed cost: 1-image task vs `command: true` task | **{one / cmd:.2f}x** | <= 1.2x |")
        print(f"| loop of {IMAGES} tasks vs one task over {IMAGES} paths | **{loop / fifty:.1f}x** | (informative) |")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
