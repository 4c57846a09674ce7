#!/usr/bin/env python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark: qcow2_backup on a 1 GiB disk of random data with 5% of its clusters changed, in one run.

Measures, per round: a plain `cp` of the image (and `cp` + fsync: the module fsyncs its backups), a full offline
backup (with verify, the default: qemu-img convert + compare + checksum; and without verify), then 5% of the
clusters rewritten at random places and an incremental backup (helper qemu-storage-daemon + blockdev-backup +
compare + checksum). The module runs in this process (its main(), as Ansible would run it, minus Ansible's fixed
per-task start-up). A second incremental (another 5%) runs with verify=false. Prints a Markdown table for
docs/performance.md with the goals of issue 10: incremental time and size <= 0.1x the full backup's, full backup
time <= 1.2x cp. Not a test: it asserts nothing.

Usage (from the repo root, with the collection on ANSIBLE_COLLECTIONS_PATH):  make bench-backup  [BENCH_ROUNDS=3]
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.environ.get("ANSIBLE_COLLECTIONS_PATH", str(Path(__file__).resolve().parents[1] / "build" / "src"))
sys.path.insert(0, ROOT.split(os.pathsep)[0])
from ansible.module_utils.testing import patch_module_args  # noqa: E402

from ansible_collections.vmsnap.qemu.plugins.modules import qcow2_backup  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_BACKUP_ROUNDS", os.environ.get("BENCH_ROUNDS", "3")))
SIZE = 1024 * 1024 * 1024
CLUSTER = 64 * 1024
CHANGED = 0.05


def sh(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def module(**args: object) -> tuple[float, dict]:
    out = io.StringIO()
    started = time.perf_counter()
    with patch_module_args(dict(args)), contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        qcow2_backup.main()
    seconds = time.perf_counter() - started
    result = json.loads(out.getvalue())
    if result.get("failed"):
        raise RuntimeError(result.get("msg"))
    return seconds, result


def make_disk(folder: Path) -> Path:
    raw, disk = folder / "random.raw", folder / "disk.qcow2"
    with open(raw, "wb") as handle:
        for dummy in range(SIZE // (64 * 1024 * 1024)):
            handle.write(os.urandom(64 * 1024 * 1024))
    sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)])
    raw.unlink()
    return disk


def change_clusters(disk: Path, seed: int) -> int:
    clusters = SIZE // CLUSTER
    chosen = random.Random(seed).sample(range(clusters), int(clusters * CHANGED))
    argv = ["qemu-io", "-f", "qcow2"]
    for number in sorted(chosen):
        argv += ["-c", f"write -P {number % 251 + 1} {number * CLUSTER} {CLUSTER}"]
    sh(argv + [str(disk)])
    return len(chosen) * CLUSTER


def timed_cp(disk: Path, target: Path, fsync: bool) -> float:
    started = time.perf_counter()
    sh(["cp", str(disk), str(target)])
    if fsync:
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def timed_convert(disk: Path, target: Path) -> float:
    """The copy step of a full backup alone: qemu-img convert + fsync, no bitmap, check or checksum."""
    started = time.perf_counter()
    sh(["qemu-img", "convert", "-q", "-O", "qcow2", str(disk), str(target)])
    fd = os.open(target, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - started


def timed_sha256(path: Path) -> float:
    """One sequential SHA-256 read of a file (the floor of the module's per-backup checksum)."""
    started = time.perf_counter()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return time.perf_counter() - started


def one_round(folder: Path, disk: Path, number: int) -> dict[str, float]:
    dest = folder / f"backups-{number}"
    dest.mkdir()
    row: dict[str, float] = {}
    sh(["sync"])
    row["cp"] = timed_cp(disk, folder / "copy.qcow2", fsync=False)
    row["cp_fsync"] = timed_cp(disk, folder / "copy.qcow2", fsync=True)
    row["convert_fsync"] = timed_convert(disk, folder / "copy.qcow2")
    row["sha256"] = timed_sha256(folder / "copy.qcow2")
    (folder / "copy.qcow2").unlink()
    row["full_noverify"], result = module(path=str(disk), dest_dir=str(dest), mode="full", verify=False,
                                          skip_unchanged=False)  # fmt: skip
    row["full"], result = module(path=str(disk), dest_dir=str(dest), mode="full", skip_unchanged=False)
    row["full_size"] = result["backup"]["size"]
    row["changed_bytes"] = change_clusters(disk, number)
    row["incremental"], result = module(path=str(disk), dest_dir=str(dest))
    assert result["backup"]["mode"] == "incremental"
    row["incremental_size"] = result["backup"]["size"]
    change_clusters(disk, number + 1000)
    row["incremental_noverify"], result = module(path=str(disk), dest_dir=str(dest), verify=False)
    row["incremental_noverify_size"] = result["backup"]["size"]
    shutil.rmtree(dest)
    return row


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vmsnap-bench-backup-", dir=os.environ.get("BENCH_DIR")) as tmp:
        folder = Path(tmp)
        disk = make_disk(folder)
        rows = [one_round(folder, disk, number) for number in range(ROUNDS)]
    med = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    print(f"qcow2_backup benchmark, {datetime.date.today()}, {ROUNDS} round(s), medians; 1 GiB qcow2 of random data,")
    print(f"{CHANGED:.0%} of its 64 KiB clusters rewritten at random places between the full and the incremental.\n")
    print("| what | time (s) | size (MiB) | ratio (full: to cp+fsync; incremental: to the full backup) | goal |")
    print("|---|---|---|---|---|")
    mib = 1024 * 1024
    base = med["cp_fsync"]
    rows_out = [
        ("`cp` of the image", med["cp"], "", "", ""),
        ("`cp` + fsync", base, "", "", ""),
        (
            "`qemu-img convert` + fsync (a full backup's copy step alone)",
            med["convert_fsync"],
            "",  # fmt: skip
            f"{med['convert_fsync'] / base:.2f}x",
            "",
        ),
        (
            "SHA-256 read of the 1 GiB copy (a full backup's checksum alone)",
            med["sha256"],
            "",
            f"{med['sha256'] / base:.2f}x",
            "",
        ),
        (
            "full backup, verify=false",
            med["full_noverify"],
            "",
            f"{med['full_noverify'] / base:.2f}x",
            "<= 1.2x",
        ),
        (
            "full backup (verify: compare + checksum)",
            med["full"],
            f"{med['full_size'] / mib:.0f}",
            f"{med['full'] / base:.2f}x",
            "<= 1.2x",
        ),
        (
            "incremental backup (verify)",
            med["incremental"],
            f"{med['incremental_size'] / mib:.1f}",
            f"time {med['incremental'] / med['full']:.3f}x, size {med['incremental_size'] / med['full_size']:.3f}x",
            "<= 0.1x",
        ),
        (
            "incremental backup, verify=false (another 5%)",
            med["incremental_noverify"],
            f"{med['incremental_noverify_size'] / mib:.1f}",
            f"time {med['incremental_noverify'] / med['full_noverify']:.3f}x of the full with verify=false",
            "<= 0.1x",
        ),
    ]
    for what, seconds, size, ratio, goal in rows_out:
        print(f"| {what} | {seconds:.2f} | {size} | {ratio} | {goal} |")
    print(f"\nChanged data: {med['changed_bytes'] / mib:.1f} MiB. Load average at the end: {os.getloadavg()[0]:.2f}.")


if __name__ == "__main__":
    main()
