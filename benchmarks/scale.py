#!/usr/bin/env python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark: the collection at scale (issue 11, item 6). Not a test: it asserts nothing.

Four parts, each comparing like with like in the same run (medians of interleaved rounds):

- snapshots: an image with 1,000 internal snapshots against one with a single snapshot: qcow2_snapshot planning
  (the module's read + plan_image, in this process), the module's main() in this process in check mode and for
  real (present of a new name, then absent), and the same as Ansible tasks. The 1,000-snapshot image takes about
  a minute of `qemu-img snapshot -c` to build, so it is cached in ~/.cache/vmsnap.qemu/bench (or
  $VMSNAP_BENCH_CACHE) and copied for each run.
- dependants: a search_dirs folder of 5,000 qcow2 images; find_dependants() (qcow2_chain absent/committed and
  qcow2_info's dependants scan) and qcow2_chain committed in check mode with and without that folder.
- vm_info: qemu_vm_info over 50 running VMs without a guest OS (tests/vm/fleet.py, -S: started paused, so they
  cost no CPU) by sockets_glob, against one VM, in this process and as an Ansible task.
- paths: qcow2_snapshot paths: over 200 images (present, then absent) against a 1-image task and a raw
  `qemu-img snapshot -c` / `-d` shell loop over 200 other images (and `-c` through `xargs -P`, as many at a time as
  the module), alternating round by round with the module's plays.

Usage (from the repo root, with the collection on ANSIBLE_COLLECTIONS_PATH):
  make bench-scale   [BENCH_SCALE_PARTS=snapshots,dependants,vm_info,paths] [BENCH_ROUNDS=5]
Prints Markdown tables for docs/performance.md.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ROOT = os.environ.get("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src"))
sys.path.insert(0, ROOT.split(os.pathsep)[0])
sys.path.insert(0, str(REPO / "tests" / "vm"))
from _timing import timed_play  # noqa: E402
from ansible.module_utils.testing import patch_module_args  # noqa: E402

from ansible_collections.vmsnap.qemu.plugins.module_utils._chain import find_dependants  # noqa: E402
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg  # noqa: E402
from ansible_collections.vmsnap.qemu.plugins.module_utils._snapshot import plan_image  # noqa: E402
from ansible_collections.vmsnap.qemu.plugins.modules import (  # noqa: E402
    qcow2_chain,
    qcow2_snapshot,
    qemu_vm_info,
)

PARTS = os.environ.get("BENCH_SCALE_PARTS", "snapshots,dependants,vm_info,paths").split(",")
ROUNDS = int(os.environ.get("BENCH_SCALE_ROUNDS", os.environ.get("BENCH_ROUNDS", "5")))
SNAPSHOTS = 1000
IMAGES_SCANNED = 5000
VMS = 50
PATHS = 200
CACHE = Path(os.environ.get("VMSNAP_BENCH_CACHE", Path.home() / ".cache" / "vmsnap.qemu" / "bench"))


def sh(argv: list[str], **kwargs: t.Any) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


def med(values: t.Iterable[float]) -> float:
    return statistics.median(list(values))


def ms(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1000:.3f} ms"
    return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


class _Bins:
    """What QemuImg needs of an AnsibleModule, for calls made directly by the benchmark."""

    @staticmethod
    def get_bin_path(name: str, required: bool = False) -> str:
        return t.cast(str, shutil.which(name))


def run_main(module: t.Any, args: dict[str, t.Any], check: bool = False) -> tuple[float, dict[str, t.Any]]:
    """A module's main() in this process, as Ansible runs it minus Ansible's per-task start-up."""
    out = io.StringIO()
    args = dict(args, _ansible_check_mode=check)
    started = time.perf_counter()
    with patch_module_args(args), contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        module.main()
    seconds = time.perf_counter() - started
    result = json.loads(out.getvalue())
    if result.get("failed"):
        raise RuntimeError(f"{module.__name__} failed: {result.get('msg')}")
    return seconds, result


def timed(func: t.Callable[[], t.Any]) -> float:
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


def task_medians(rows: list[dict[str, t.Any]]) -> dict[str, float]:
    """Task name 'label#round' -> median seconds per label."""
    by_label: dict[str, list[float]] = {}
    for row in rows:
        by_label.setdefault(row["task"].split("#")[0], []).append(row["seconds"])
    return {label: med(values) for label, values in by_label.items()}


def command_true(rnd: int) -> dict[str, t.Any]:
    return {"name": f"command-true#{rnd}", "ansible.builtin.command": {"argv": ["true"]}, "changed_when": False}


# --- 1,000 internal snapshots ----------------------------------------------------------------------------------


def cached_many_snapshots() -> tuple[Path, float | None]:
    """The 1,000-snapshot image (16 MiB, 1 MiB written before the first snapshot), built once; build seconds."""
    image = CACHE / f"snapshots-{SNAPSHOTS}.qcow2"
    if image.exists():
        return image, None
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = image.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    started = time.perf_counter()
    sh(["qemu-img", "create", "-q", "-f", "qcow2", str(partial), "16M"])
    sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 1M", str(partial)])
    for number in range(SNAPSHOTS):
        sh(["qemu-img", "snapshot", "-c", f"snap-{number:04d}", str(partial)])
    os.replace(partial, image)
    return image, time.perf_counter() - started


def part_snapshots(work: Path) -> None:
    cached, built = cached_many_snapshots()
    many = work / "many.qcow2"
    sh(["cp", "--sparse=always", str(cached), str(many)])
    one = work / "one.qcow2"
    sh(["qemu-img", "create", "-q", "-f", "qcow2", str(one), "16M"])
    sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 1M", str(one)])
    sh(["qemu-img", "snapshot", "-c", "snap-0000", str(one)])
    images = {"1": str(one), str(SNAPSHOTS): str(many)}
    qemu_img = QemuImg(t.cast(t.Any, _Bins()))
    samples: dict[tuple[str, str], list[float]] = {}

    def add(what: str, key: str, seconds: float) -> None:
        samples.setdefault((what, key), []).append(seconds)

    def plan(path: str) -> None:
        info = qemu_img.read_top_many([path])[0]
        plan_image(path, info, "present", "bench-new", None, time.time())

    for rnd in range(ROUNDS):
        for key, path in images.items() if rnd % 2 == 0 else reversed(list(images.items())):
            for dummy in range(20):  # a single plan is well under a millisecond on a small image
                add("plan", key, timed(lambda: plan(path)) / 20)  # noqa: B023
            add("info", key, timed(lambda: sh(["qemu-img", "info", "--output=json", path])))  # noqa: B023
            add("check", key, run_main(qcow2_snapshot, {"path": path, "name": f"bench-{rnd}"}, check=True)[0])
            add("present", key, run_main(qcow2_snapshot, {"path": path, "name": f"bench-{rnd}"})[0])
            add("absent", key, run_main(qcow2_snapshot, {"path": path, "name": f"bench-{rnd}", "state": "absent"})[0])
            add("raw-c", key, timed(lambda: sh(["qemu-img", "snapshot", "-c", "raw", path])))  # noqa: B023
            add("raw-d", key, timed(lambda: sh(["qemu-img", "snapshot", "-d", "raw", path])))  # noqa: B023
    tasks: list[dict[str, t.Any]] = []
    for rnd in range(ROUNDS):
        tasks.append(command_true(rnd))
        for key, path in images.items():
            snap = {"path": path, "name": f"task-{rnd}"}
            tasks += [
                {"name": f"task-check-{key}#{rnd}", "vmsnap.qemu.qcow2_snapshot": snap, "check_mode": True},
                {"name": f"task-present-{key}#{rnd}", "vmsnap.qemu.qcow2_snapshot": snap},
                {"name": f"task-absent-{key}#{rnd}", "vmsnap.qemu.qcow2_snapshot": dict(snap, state="absent")},
            ]
    tasks_med = task_medians(timed_play(tasks, work, "scale-snapshots"))
    for key in images:
        for what in ("check", "present", "absent"):
            add(f"task-{what}", key, tasks_med[f"task-{what}-{key}"])
    print(f"### {SNAPSHOTS} internal snapshots vs 1 ({ROUNDS} rounds, medians)")
    print()
    if built is not None:
        print(f"Built the {SNAPSHOTS}-snapshot image in {built:.1f} s (cached in {CACHE}).")
    else:
        print(f"The {SNAPSHOTS}-snapshot image came from the cache ({CACHE}).")
    print()
    rows = [
        ("plan", "planning in this process: read_top (native reader) + plan_image, present of a new name"),
        ("info", "raw `qemu-img info --output=json` (for scale)"),
        ("check", "qcow2_snapshot main() in this process, check mode, present of a new name"),
        ("present", "qcow2_snapshot main() in this process, present of a new name (creates it)"),
        ("absent", "qcow2_snapshot main() in this process, absent (deletes it again)"),
        ("raw-c", "raw `qemu-img snapshot -c`"),
        ("raw-d", "raw `qemu-img snapshot -d`"),
        ("task-check", "Ansible task, check mode, present of a new name"),
        ("task-present", "Ansible task, present of a new name"),
        ("task-absent", "Ansible task, absent"),
    ]
    print(f"| measurement | 1 snapshot | {SNAPSHOTS} snapshots | ratio | target |")
    print("|---|---|---|---|---|")
    for what, label in rows:
        low, high = med(samples[(what, "1")]), med(samples[(what, str(SNAPSHOTS))])
        target = "<= 1.5x" if what in ("check", "task-check") else ""
        print(f"| {label} | {ms(low)} | {ms(high)} | **{high / low:.2f}x** | {target} |")
    print(f"| `command: true` task | {ms(tasks_med['command-true'])} | | | |")
    print()


# --- 5,000 images for the dependants scan --------------------------------------------------------------------


def clone_sparse(template: bytes, target: Path) -> None:
    """Write a copy of a small image file, leaving its all-zero 4 KiB blocks as holes."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for offset in range(0, len(template), 4096):
            block = template[offset : offset + 4096]
            if block.count(0) != len(block):
                os.pwrite(fd, block, offset)
        os.ftruncate(fd, len(template))
    finally:
        os.close(fd)


def part_dependants(work: Path) -> None:
    folder = work / "images"
    folder.mkdir()
    others = work / "other-base.qcow2"
    base, top = work / "base.qcow2", work / "top.qcow2"
    for image in (others, base):
        sh(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"])
    sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)])
    # Every scanned image is an overlay (a backing name to resolve) on another base; one in ten has a snapshot.
    templates = []
    for index, snapshots in ((0, 0), (1, 1)):
        template = work / f"template-{index}.qcow2"
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(others), "-F", "qcow2", str(template)])
        if snapshots:
            sh(["qemu-img", "snapshot", "-c", "snap", str(template)])
        templates.append(template.read_bytes())
    started = time.perf_counter()
    for number in range(IMAGES_SCANNED):
        clone_sparse(templates[1 if number % 10 == 0 else 0], folder / f"disk-{number:05d}.qcow2")
    made = time.perf_counter() - started
    qemu_img = QemuImg(t.cast(t.Any, _Bins()))
    sh(["sync"])
    # A first scan after the files were written (their pages are in the cache, as on a busy hypervisor).
    first = timed(lambda: find_dependants(qemu_img, str(base), [str(folder)]))
    scans, module_with, module_without = [], [], []
    args = {"path": str(top), "backing": str(base), "state": "committed"}
    for dummy in range(ROUNDS):
        scans.append(timed(lambda: find_dependants(qemu_img, str(base), [str(folder)])))
        module_with.append(run_main(qcow2_chain, dict(args, search_dirs=[str(folder)]), check=True)[0])
        module_without.append(run_main(qcow2_chain, dict(args, search_dirs=[]), check=True)[0])
    sample = sorted(folder.iterdir())[:50]
    info_each = timed(lambda: [sh(["qemu-img", "info", "--output=json", str(path)]) for path in sample]) / len(sample)
    print(f"### Dependants scan over a search_dirs folder of {IMAGES_SCANNED} images ({ROUNDS} rounds, medians)")
    print()
    print(f"Writing the {IMAGES_SCANNED} images (sparse copies of two qemu-img-made overlays) took {made:.1f} s.")
    print()
    scan = med(scans)
    without, with_scan = med(module_without), med(module_with)
    print("| measurement | time | per image | target |")
    print("|---|---|---|---|")
    print(f"| find_dependants(), first scan after the images were written | {ms(first)} | | |")
    print(
        f"| find_dependants() | {ms(scan)} | {scan / IMAGES_SCANNED * 1e6:.0f} µs "
        f"| < 2 s: {'met' if scan < 2 else 'missed'} |"
    )
    print(
        "| qcow2_chain committed, check mode, main() in this process, search_dirs not given "
        f"(the folder of path: 5 images) | {ms(without)} | | |"
    )
    print(
        f"| the same with search_dirs: [the {IMAGES_SCANNED}-image folder] | {ms(with_scan)} "
        f"| {(with_scan - without) / IMAGES_SCANNED * 1e6:.0f} µs | |"
    )
    print(
        f"| raw `qemu-img info` per image (50 of them), for scale | | {info_each * 1000:.1f} ms "
        f"(= {info_each * IMAGES_SCANNED:.0f} s for {IMAGES_SCANNED}) | |"
    )
    print()


# --- qemu_vm_info over 50 VMs --------------------------------------------------------------------------------


def part_vm_info(work: Path) -> None:
    from fleet import NoOsVM

    vms: list[NoOsVM] = []
    try:
        started = time.perf_counter()
        for number in range(VMS):
            vm = NoOsVM(work / "vms", f"vm{number:02d}", memory_mib=32).create_disks()
            vm.start(["-S"])
            vms.append(vm)
        boot = time.perf_counter() - started
        pattern = str(work / "vms" / "*" / "qmp.sock")
        assert len(glob.glob(pattern)) == VMS
        single = str(vms[0].qmp)
        glob_runs, one_runs = [], []
        for rnd in range(ROUNDS):
            if rnd % 2:
                one_runs.append(run_main(qemu_vm_info, {"socket": single})[0])
            seconds, result = run_main(qemu_vm_info, {"sockets_glob": pattern})
            glob_runs.append(seconds)
            if len(result["vms"]) != VMS or any("error" in vm for vm in result["vms"]):
                raise RuntimeError(f"qemu_vm_info did not read all {VMS} VMs")
            if rnd % 2 == 0:
                one_runs.append(run_main(qemu_vm_info, {"socket": single})[0])
        tasks: list[dict[str, t.Any]] = []
        for rnd in range(ROUNDS):
            tasks += [
                command_true(rnd),
                {"name": f"one#{rnd}", "vmsnap.qemu.qemu_vm_info": {"socket": single}},
                {"name": f"glob#{rnd}", "vmsnap.qemu.qemu_vm_info": {"sockets_glob": pattern}},
            ]
        tasks_med = task_medians(timed_play(tasks, work, "scale-vm-info"))
    finally:
        for vm in vms:
            vm.kill()
    print(f"### qemu_vm_info over {VMS} running VMs by sockets_glob ({ROUNDS} rounds, medians)")
    print()
    print(f"{VMS} VMs without a guest OS (`-m 32`, one 16 MiB qcow2 disk, TCG, `-S`), started in {boot:.1f} s.")
    print()
    one, fifty = med(one_runs), med(glob_runs)
    print("| measurement | 1 VM (`socket`) | 50 VMs (`sockets_glob`) | per VM ((50 - 1) / 49) |")
    print("|---|---|---|---|")
    print(f"| main() in this process | {ms(one)} | {ms(fifty)} | {ms((fifty - one) / (VMS - 1))} |")
    task_one, task_fifty = tasks_med["one"], tasks_med["glob"]
    print(f"| Ansible task | {ms(task_one)} | {ms(task_fifty)} | {ms((task_fifty - task_one) / (VMS - 1))} |")
    print(f"| `command: true` task | {ms(tasks_med['command-true'])} | | |")
    print()


# --- qcow2_snapshot paths: over 200 images -------------------------------------------------------------------


def raw_loop(paths: list[str], flag: str, name: str) -> float:
    script = f'for f in "$@"; do qemu-img snapshot {flag} "$0" "$f" || exit 1; done'
    return timed(lambda: subprocess.run(["bash", "-c", script, name, *paths], check=True))


def raw_parallel(paths: list[str], name: str, jobs: int, flag: str = "-c") -> float:
    argv = ["xargs", "-0", "-P", str(jobs), "-n", "1", "qemu-img", "snapshot", flag, name]
    return timed(lambda: subprocess.run(argv, input="\0".join(paths), text=True, check=True))


def part_paths(work: Path) -> None:
    folder = work / "paths"
    folder.mkdir()
    module_images, raw_images = [], []
    for prefix, images in (("m", module_images), ("r", raw_images)):
        for number in range(PATHS):
            path = folder / f"{prefix}-{number:03d}.qcow2"
            sh(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"])
            images.append(str(path))
    single = str(folder / "single.qcow2")
    sh(["qemu-img", "create", "-q", "-f", "qcow2", single, "16M"])
    rows: list[dict[str, t.Any]] = []
    raw: dict[str, list[float]] = {"-c": [], "-d": [], "-c parallel": []}
    jobs = max(2, min(8, os.cpu_count() or 1))  # the module's _qemu_img.MAX_PARALLEL
    # Module and raw runs alternate round by round (each state's play, then its raw loop, or the other way round),
    # so that both see the same moments of a shared machine's load.
    for rnd in range(ROUNDS):
        for state, flag in (("present", "-c"), ("absent", "-d")):
            args = {"name": f"b{rnd}", "state": state}
            tasks = [
                command_true(rnd),
                {"name": f"one-{state}#{rnd}", "vmsnap.qemu.qcow2_snapshot": dict(args, path=single)},
                {"name": f"many-{state}#{rnd}", "vmsnap.qemu.qcow2_snapshot": dict(args, paths=module_images)},
            ]
            steps = [
                lambda: rows.extend(timed_play(tasks, work, f"scale-paths-{state}-{rnd}")),  # noqa: B023
                lambda: raw[flag].append(raw_loop(raw_images, flag, f"raw-{rnd}")),  # noqa: B023
            ]
            if flag == "-c":
                steps.append(lambda: raw["-c parallel"].append(raw_parallel(raw_images, f"rawp-{rnd}", jobs)))  # noqa: B023
            else:
                steps.append(lambda: raw_parallel(raw_images, f"rawp-{rnd}", jobs, "-d"))  # noqa: B023
            for step in steps if rnd % 2 == 0 else reversed(steps):
                step()
    tasks_med = task_medians(rows)
    raw_c, raw_d, raw_cp = med(raw["-c"]), med(raw["-d"]), med(raw["-c parallel"])
    print(f"### qcow2_snapshot paths: over {PATHS} images ({ROUNDS} rounds, medians)")
    print()
    print(
        f"| state | 1-image task | {PATHS}-image task | per image ((task {PATHS} - task 1) / {PATHS - 1}) "
        f"| raw shell loop over {PATHS} | raw per image | ratio per image |"
    )
    print("|---|---|---|---|---|---|---|")
    for state, raw_total in (("present", raw_c), ("absent", raw_d)):
        one, many = tasks_med[f"one-{state}"], tasks_med[f"many-{state}"]
        per_image = (many - one) / (PATHS - 1)
        flag = "-c" if state == "present" else "-d"
        print(
            f"| {state} (raw: `qemu-img snapshot {flag}`) | {ms(one)} | {ms(many)} | {ms(per_image)} "
            f"| {ms(raw_total)} | {ms(raw_total / PATHS)} | **{per_image / (raw_total / PATHS):.2f}x** |"
        )
    print(f"| `command: true` task | {ms(tasks_med['command-true'])} | | | | | |")
    print()
    per_image = (tasks_med["many-present"] - tasks_med["one-present"]) / (PATHS - 1)
    print(
        f"Like for like with the module's creates ({jobs} at a time): raw `qemu-img snapshot -c` through "
        f"`xargs -P {jobs}` over {PATHS} images {ms(raw_cp)}, {ms(raw_cp / PATHS)} per image; the module's present "
        f"per image / that: **{per_image / (raw_cp / PATHS):.2f}x**."
    )
    print()


def main() -> int:
    qemu = sh(["qemu-img", "--version"]).stdout.splitlines()[0]
    core = sh([str(Path(sys.executable).parent / "ansible"), "--version"]).stdout.splitlines()[0]
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, TCG")
    print(f"tools: {qemu}; {core}; Python {platform.python_version()}")
    print(f"load average at the start: {' / '.join(f'{value:.2f}' for value in os.getloadavg())}")
    print()
    parts = {"snapshots": part_snapshots, "dependants": part_dependants, "vm_info": part_vm_info, "paths": part_paths}
    for name in PARTS:
        work = Path(tempfile.mkdtemp(prefix=f"vmsnap-scale-{name}-", dir=os.environ.get("BENCH_DIR")))
        started = time.perf_counter()
        try:
            parts[name](work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(
            f"(part {name}: {time.perf_counter() - started:.0f} s; load average after it: "
            f"{' / '.join(f'{value:.2f}' for value in os.getloadavg())})"
        )
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
