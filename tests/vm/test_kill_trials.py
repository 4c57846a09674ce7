# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Issue 11 item 3: SIGKILL of the module process at seeded random moments of its work (kill_trials.py says how the
module runs and how a trial is replayed). After each kill: every image passes qemu-img check, the data written before
the task reads back, the VM runs (or is in the state the next run reports), and the next run of the same task
converges (a repeat is unchanged) with no vmsnap job left in QEMU. `make soak` runs the same with more trials."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest
from fleet import NoOsVM, qmp_execute
from kill_trials import (
    Outcome,
    classify,
    converge,
    fraction,
    ok,
    qemu_img_check,
    qemu_io_reads,
    qemu_io_write,
    record,
    run_module,
    trial_indexes,
)

pytestmark = pytest.mark.timeout(900) if hasattr(pytest.mark, "timeout") else []


def _trial(
    group: str,
    index: int,
    window: tuple[float, float],
    module: str,
    args: dict[str, t.Any],
    observe: t.Callable[[], t.Any],
    check: t.Callable[[], None],
    target: t.Any = None,
) -> Outcome:
    """Kill one run at a seeded moment, check, converge, check again."""
    share = fraction(group, index)
    delay = window[0] + share * (window[1] - window[0])
    before = observe()
    run = run_module(module, args, kill_after=delay)
    after = observe()
    check()
    result = converge(module, args)
    converged = observe()
    check()
    if target is not None:
        assert converged == target, f"{group}:{index}: converged to {converged}, wanted {target}"
    outcome = Outcome(
        group,
        index,
        share,
        delay,
        run.killed,
        classify(before, after, converged) if run.killed else "not killed (finished first)",
        "changed" if result["changed"] else "unchanged",
        run.orphans,
    )
    for warning in result.get("warnings") or []:
        outcome.notes.append(f"warning={warning!r}")
    record(outcome)
    return outcome


def _measure(module: str, args: dict[str, t.Any]) -> tuple[float, float]:
    """The window where the task works: from the end of a check-mode run (start-up, reads and planning; 10% earlier
    for noise) to the end of the real run."""
    check = run_module(module, {**args, "_ansible_check_mode": True})
    assert check.result is not None and not check.result.get("failed"), check.result
    run = run_module(module, args)
    assert run.result is not None and not run.result.get("failed"), run.result
    return check.elapsed * 0.9, max(run.elapsed, check.elapsed)


def _snapshots(path: Path) -> list[str]:
    import json
    import subprocess

    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True, check=True
        ).stdout
    )
    return sorted(snap["name"] for snap in info.get("snapshots") or [])


# -- offline ------------------------------------------------------------------------------------------------------


def test_kill_qcow2_snapshot_paths(tmp_path: Path) -> None:
    images = [tmp_path / f"disk{i}.qcow2" for i in range(4)]
    for image in images:
        import subprocess

        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
        qemu_io_write(image, 0xAA, "0", "4M")
    paths = [str(image) for image in images]
    windows = [_measure("qcow2_snapshot", {"paths": paths, "name": "m", "state": s}) for s in ("present", "absent")]
    window = (min(w[0] for w in windows), max(w[1] for w in windows))

    def observe() -> list[list[str]]:
        return [_snapshots(image) for image in images]

    def check() -> None:
        for image in images:
            qemu_img_check(image)
            assert qemu_io_reads(image, 0xAA, "0", "4M"), f"{image} lost its data"

    for index in trial_indexes("qcow2_snapshot", 10):
        name = f"k{index // 2}"
        state = "present" if index % 2 == 0 else "absent"
        wanted = [[name]] * len(images) if state == "present" else [[]] * len(images)
        _trial(
            "qcow2_snapshot", index, window, "qcow2_snapshot", {"paths": paths, "name": name, "state": state},
            observe, check, wanted,
        )  # fmt: skip


def _chain(folder: Path) -> tuple[Path, Path]:
    """base: 0xAA at 0, 0x11 at 8M; overlay: 0xBB over the first 8M (enough data for the commit/convert to take a
    moment)."""
    import subprocess

    for leftover in folder.iterdir():
        assert leftover.is_file(), f"{leftover} left behind"
        leftover.unlink()
    base, overlay = folder / "base.qcow2", folder / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "32M"], check=True)
    qemu_io_write(base, 0xAA, "0", "8M")
    qemu_io_write(base, 0x11, "8M", "8M")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)], check=True
    )
    qemu_io_write(overlay, 0xBB, "0", "8M")
    return base, overlay


def _backing(path: Path) -> str | None:
    import json
    import subprocess

    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True, check=True
        ).stdout
    )
    return info.get("backing-filename")


@pytest.mark.parametrize("state", ["committed", "flattened"])
def test_kill_qcow2_chain(tmp_path: Path, state: str) -> None:
    folder = tmp_path / "chain"
    folder.mkdir()
    base, overlay = _chain(folder)
    args: dict[str, t.Any] = {"path": str(overlay), "state": state}
    if state == "committed":
        args["backing"] = str(base)
    window = _measure("qcow2_chain", args)

    def observe() -> tuple[t.Any, ...]:
        files = sorted(p.name for p in folder.iterdir())
        top = overlay if overlay.exists() else base
        return (
            files,
            _backing(overlay) if overlay.exists() else None,
            qemu_io_reads(base, 0xBB, "0", "8M"),
        )

    def check() -> None:
        for image in (base, overlay):
            if image.exists():
                qemu_img_check(image)
        top = overlay if overlay.exists() else base
        assert qemu_io_reads(top, 0xBB, "0", "8M"), f"{top}: the overlay's data is lost"
        assert qemu_io_reads(top, 0x11, "8M", "8M"), f"{top}: the base's data is lost"

    for index in trial_indexes(f"qcow2_chain_{state}", 6):
        _chain(folder)
        target = (["base.qcow2"], None, True) if state == "committed" else (["base.qcow2", "top.qcow2"], None, False)
        _trial(f"qcow2_chain_{state}", index, window, "qcow2_chain", args, observe, check, target)


# -- live ---------------------------------------------------------------------------------------------------------


def _vmsnap_jobs(vm: NoOsVM) -> list[dict[str, t.Any]]:
    return [job for job in qmp_execute(vm.qmp, "query-jobs") if str(job.get("id", "")).startswith("vmsnap-")]


@pytest.fixture
def live_vm(fleet_dir: Path) -> t.Iterator[NoOsVM]:
    vm = NoOsVM(fleet_dir, "kills", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    yield vm
    vm.kill()


def test_kill_qmp_live_snapshot_internal(live_vm: NoOsVM) -> None:
    vm = live_vm
    sock = str(vm.qmp)
    # One cycle: checkpoint with RAM, guest writes, revert, release; disk-only snapshot, release.
    cycle: list[tuple[str, dict[str, t.Any]]] = [
        ("present_vmstate", {"name": "a", "state": "present"}),
        ("reverted", {"name": "a", "state": "reverted"}),
        ("absent_vmstate", {"name": "a", "state": "absent"}),
        ("present_disk_only", {"name": "b", "state": "present", "vmstate": False}),
        ("absent_disk_only", {"name": "b", "state": "absent", "vmstate": False}),
    ]
    durations = {}
    for label, args in cycle:
        durations[label] = _measure("qmp_live_snapshot", {"socket": sock, **args})
    expected = {"a": 0xAA}

    def observe() -> tuple[t.Any, ...]:
        return (_snapshots(vm.disks[0]), vm.status())

    def check() -> None:
        qemu_img_check(vm.disks[0], shared=True)

    for index in trial_indexes("qmp_live_snapshot_internal", 10):
        label, args = cycle[index % len(cycle)]
        if label == "present_vmstate":
            pattern = 0x20 + index
            vm.write(pattern)
            expected["a"] = pattern
        elif label == "reverted":
            vm.write(0xEE)  # written after the checkpoint: the revert throws it away
        current = expected["a"] if label != "present_disk_only" else None
        group = f"qmp_live_snapshot_{label}"
        wanted_snaps = ["a"] if label in ("present_vmstate", "reverted") else (["b"] if label == "present_disk_only" else [])
        _trial(group, index, durations[label], "qmp_live_snapshot", {"socket": sock, **args}, observe, check,
               (wanted_snaps, "running"))  # fmt: skip
        assert _vmsnap_jobs(vm) == [], f"{group}:{index}: jobs left in QEMU: {_vmsnap_jobs(vm)}"
        if current is not None and label != "absent_disk_only":
            assert vm.reads(current), f"{group}:{index}: the guest does not read {current:#x}"
        vm.status() == "running"


def test_kill_qmp_live_snapshot_external(fleet_dir: Path) -> None:
    vm = NoOsVM(fleet_dir, "kills-ext", disks=2, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        sock = str(vm.qmp)
        cycle = [
            ("present_external", {"name": "e", "mode": "external", "state": "present", "vmstate": False}),
            ("absent_external", {"name": "e", "mode": "external", "state": "absent", "vmstate": False}),
        ]
        durations = {}
        for label, args in cycle:
            if label == "absent_external":
                for drive in ("drive0", "drive1"):
                    vm.qemu_io(drive, "write -P 0x31 0 8M")  # data for the commit to merge
            durations[label] = _measure("qmp_live_snapshot", {"socket": sock, **args})

        def observe() -> tuple[t.Any, ...]:
            return (
                sorted(p.name for p in vm.folder.iterdir() if p.suffix == ".qcow2"),
                [vm.active_file(d).name for d in ("drive0", "drive1")],
                vm.status(),
            )

        def check() -> None:
            for drive in ("drive0", "drive1"):
                image = vm.active_file(drive)
                qemu_img_check(image, shared=True)
                if _backing(image):
                    qemu_img_check(Path(_backing(image) or ""), shared=True)

        for index in trial_indexes("qmp_live_snapshot_external", 8):
            label, args = cycle[index % len(cycle)]
            pattern = 0x40 + index
            for drive in ("drive0", "drive1"):
                vm.qemu_io(drive, f"write -P {pattern:#x} 0 8M")
            disks = ["disk0.qcow2", "disk1.qcow2"]
            if label == "present_external":
                overlays = ["disk0.vmsnap-e.qcow2", "disk1.vmsnap-e.qcow2"]
                target = (sorted(disks + overlays), overlays, "running")
            else:
                target = (disks, disks, "running")
            _trial(label, index, durations[label], "qmp_live_snapshot", {"socket": sock, **args}, observe, check,
                   target)  # fmt: skip
            assert _vmsnap_jobs(vm) == [], f"{label}:{index}: jobs left in QEMU: {_vmsnap_jobs(vm)}"
            for drive in ("drive0", "drive1"):
                assert vm.reads(pattern, drive), f"{label}:{index}: {drive} does not read {pattern:#x}"
    finally:
        vm.kill()
