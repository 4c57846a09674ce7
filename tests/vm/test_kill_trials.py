# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Issue 11 item 3: SIGKILL of the module process at seeded random moments of its work (kill_trials.py says how the
module runs and how a trial is replayed). After each kill: every image passes qemu-img check, the data written before
the task reads back, the VM runs (or is in the state the next run reports), and the next run of the same task
converges (a repeat is unchanged) with no vmsnap job left in QEMU. `make soak` runs the same with more trials."""

from __future__ import annotations

import os
import time
import typing as t
from pathlib import Path

import pytest
from fleet import NoOsVM, qmp_execute
from kill_trials import (
    Outcome,
    classify,
    converge,
    fraction,
    qemu_img_check,
    qemu_io_reads,
    qemu_io_write,
    record,
    run_module,
    trial_indexes,
)


def _trial(
    group: str,
    index: int,
    window: list[float],
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
    if not run.killed:
        # Finished before the kill (the machine was busier when the window was measured): later trials of this
        # group draw from the shortest full run seen.
        window[1] = min(window[1], run.elapsed)
        window[0] = min(window[0], window[1] * 0.8)
    after = observe()
    check()
    result = converge(module, args, repeat_unchanged=args.get("state") != "reverted")
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
        text = str(warning.get("event", {}).get("msg", warning) if isinstance(warning, dict) else warning)
        outcome.notes.append(f"warning={text[:160]!r}")
    record(outcome)
    return outcome


def _measure(module: str, args: dict[str, t.Any]) -> list[float]:
    """The window where the task works: from the end of a check-mode run (start-up, reads and planning; 10% earlier
    for noise) to the end of the real run."""
    check = run_module(module, {**args, "_ansible_check_mode": True})
    assert check.result is not None and not check.result.get("failed"), check.result
    run = run_module(module, args)
    assert run.result is not None and not run.result.get("failed"), run.result
    return [min(check.elapsed, run.elapsed) * 0.9, run.elapsed]


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
    images = [tmp_path / f"disk{i}.qcow2" for i in range(3)]
    for image in images:
        import subprocess

        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
        qemu_io_write(image, 0xAA, "0", "4M")
    paths = [str(image) for image in images]
    windows = [_measure("qcow2_snapshot", {"paths": paths, "name": "m", "state": s}) for s in ("present", "absent")]
    window = [min(w[0] for w in windows), max(w[1] for w in windows)]

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

    for index in trial_indexes(f"qcow2_chain_{state}", 5):
        _chain(folder)
        target = (["base.qcow2"], None, True) if state == "committed" else (["base.qcow2", "top.qcow2"], None, False)
        _trial(f"qcow2_chain_{state}", index, window, "qcow2_chain", args, observe, check, target)


# -- live ---------------------------------------------------------------------------------------------------------


def _vmsnap_jobs(vm: NoOsVM) -> list[dict[str, t.Any]]:
    return [job for job in qmp_execute(vm.qmp, "query-jobs") if str(job.get("id", "")).startswith("vmsnap-")]


def _settle(vm: NoOsVM) -> None:
    """QEMU goes on with a killed task's job or state save on its own: wait until it no longer writes (a job that
    waits in 'ready' writes nothing new) before an image is checked with -U."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        busy = [job for job in qmp_execute(vm.qmp, "query-jobs") if job.get("status") in ("created", "running")]
        migrating = qmp_execute(vm.qmp, "query-migrate").get("status") in ("setup", "active", "device")
        if not busy and not migrating:
            return
        time.sleep(0.05)
    raise AssertionError(f"{vm.name}: QEMU still busy after 120 s")


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
        _settle(vm)
        vm.qemu_io("drive0", "flush")  # a -U check reads what QEMU has written, not its caches
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
        wanted_snaps = {"present_vmstate": ["a"], "reverted": ["a"], "present_disk_only": ["b"]}.get(label, [])
        _trial(group, index, durations[label], "qmp_live_snapshot", {"socket": sock, **args}, observe, check,
               (wanted_snaps, "running"))  # fmt: skip
        assert _vmsnap_jobs(vm) == [], f"{group}:{index}: jobs left in QEMU: {_vmsnap_jobs(vm)}"
        if current is not None and label != "absent_disk_only":
            assert vm.reads(current), f"{group}:{index}: the guest does not read {current:#x}"
        assert vm.status() == "running"


def test_kill_qmp_live_snapshot_external(fleet_dir: Path) -> None:
    vm = NoOsVM(fleet_dir, "kills-ext", disks=2, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        sock = str(vm.qmp)
        cycle = [
            (
                "qmp_live_snapshot_external_present",
                {"name": "e", "mode": "external", "state": "present", "vmstate": False},
            ),
            (
                "qmp_live_snapshot_external_absent",
                {"name": "e", "mode": "external", "state": "absent", "vmstate": False},
            ),
        ]
        durations = {}
        for label, args in cycle:
            if label == "qmp_live_snapshot_external_absent":
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
            _settle(vm)
            for drive in ("drive0", "drive1"):
                vm.qemu_io(drive, "flush")
                image = vm.active_file(drive)
                qemu_img_check(image, shared=True)
                if _backing(image):
                    qemu_img_check(Path(_backing(image) or ""), shared=True)

        for index in trial_indexes("qmp_live_snapshot_external", 6):
            label, args = cycle[index % len(cycle)]
            pattern = 0x40 + index
            for drive in ("drive0", "drive1"):
                vm.qemu_io(drive, f"write -P {pattern:#x} 0 8M")
            disks = ["disk0.qcow2", "disk1.qcow2"]
            if label == "qmp_live_snapshot_external_present":
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


def test_kill_qmp_vm_state_saved(fleet_dir: Path) -> None:
    vm = NoOsVM(fleet_dir, "kills-state", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        sock = str(vm.qmp)
        folder = fleet_dir / "states"
        folder.mkdir()
        window = _measure("qmp_vm_state", {"socket": sock, "path": str(folder / "m.vmstate")})
        ok_absent = {"path": str(folder / "m.vmstate"), "state": "absent"}
        run_module("qmp_vm_state", ok_absent)

        def observe() -> tuple[t.Any, ...]:
            return (sorted(p.name for p in folder.iterdir()), vm.status())

        def check() -> None:
            _settle(vm)
            vm.qemu_io("drive0", "flush")
            qemu_img_check(vm.disks[0], shared=True)
            assert vm.reads(0xAA), "the guest's disk lost its data"

        for index in trial_indexes("qmp_vm_state_saved", 4):
            path = folder / f"s{index}.vmstate"
            target = ([path.name, f"{path.name}.json"], "running")
            _trial("qmp_vm_state_saved", index, window, "qmp_vm_state", {"socket": sock, "path": str(path)}, observe,
                   check, target)  # fmt: skip
            caps = {c["capability"]: c["state"] for c in qmp_execute(vm.qmp, "query-migrate-capabilities")}
            assert caps.get("background-snapshot") is False, f"migration settings not put back: {caps}"
            assert qmp_execute(vm.qmp, "query-migrate").get("status") in (None, "completed"), "a migration is left"
            run_module("qmp_vm_state", {"path": str(path), "state": "absent"})
    finally:
        vm.kill()


def test_kill_qcow2_backup_offline(tmp_path: Path) -> None:
    import subprocess

    image, dest = tmp_path / "disk.qcow2", tmp_path / "backups"
    dest.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
    qemu_io_write(image, 0xAA, "0", "8M")
    args = {"path": str(image), "dest_dir": str(dest)}
    window = _measure("qcow2_backup", {**args, "mode": "full"})
    written = {0xAA}

    def observe() -> list[str]:
        return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())

    def check() -> None:
        qemu_img_check(image)
        assert qemu_io_reads(image, 0xAA, "0", "1M"), "the disk lost its data"

    for index in trial_indexes("qcow2_backup_offline", 4):
        pattern = 0x50 + index
        qemu_io_write(image, pattern, f"{8 + index}M", "1M")  # new data: the next backup has something to copy
        written.add(pattern)
        mode = "full" if index % 2 == 0 else "auto"
        _trial("qcow2_backup_offline", index, window, "qcow2_backup", {**args, "mode": mode}, observe, check)
        verified = run_module("qcow2_backup", {"dest_dir": str(dest), "set_name": "disk", "state": "verified"})
        assert verified.result is not None and not verified.result.get("failed"), verified.result


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.run(["true"], check=True)
    del proc
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_next_run_completes_a_killed_tasks_commit(fleet_dir: Path) -> None:
    """The kill the trials hit only by chance, made on purpose: a task killed while its active block-commit waits in
    'ready' for job-complete (and one killed after the merge, before deleting the overlay). It failed before: the job
    stayed 'ready' forever and every later task was refused ("An earlier vmsnap job ... is still ready")."""
    vm = NoOsVM(fleet_dir, "kills-ready", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        sock = str(vm.qmp)
        args = {"socket": sock, "name": "e", "mode": "external", "vmstate": False}
        ok_run = run_module("qmp_live_snapshot", {**args, "state": "present"})
        assert ok_run.result and ok_run.result["changed"], ok_run.result
        vm.write(0x77)
        overlay = vm.active_file()
        assert overlay.name == "disk0.vmsnap-e.qcow2"
        job_id = f"vmsnap-commit-{_dead_pid()}-1"
        nodes = qmp_execute(vm.qmp, "query-named-block-nodes")
        top = next(n["node-name"] for n in nodes if n["file"] == str(overlay) and n["drv"] == "qcow2")
        base = next(n["node-name"] for n in nodes if n["file"] == str(vm.disks[0]) and n["drv"] == "qcow2")
        device = next(b["inserted"]["node-name"] for b in qmp_execute(vm.qmp, "query-block"))
        qmp_execute(vm.qmp, "block-commit", {"job-id": job_id, "device": device, "top-node": top,
                                             "base-node": base, "auto-dismiss": False})  # fmt: skip
        for dummy in range(200):
            if [j["status"] for j in qmp_execute(vm.qmp, "query-jobs")] == ["ready"]:
                break
            time.sleep(0.05)
        result = converge("qmp_live_snapshot", {**args, "state": "absent"})
        assert result["changed"] is True
        assert any(job_id in str(w) for w in result.get("warnings") or []), result
        assert qmp_execute(vm.qmp, "query-jobs") == []
        assert vm.active_file() == vm.disks[0] and not overlay.exists()
        assert vm.reads(0x77)
        qemu_img_check(vm.disks[0], shared=True)

        # Killed after the merge, before the unlink: the file outside the chain reads the same as the disk.
        ok_run = run_module("qmp_live_snapshot", {**args, "state": "present"})
        vm.write(0x78)
        qmp_execute(vm.qmp, "block-commit", {"job-id": f"vmsnap-commit-{_dead_pid()}-2", "device": device,
                                             "auto-dismiss": True})  # fmt: skip
        for dummy in range(200):
            jobs = qmp_execute(vm.qmp, "query-jobs")
            if jobs and jobs[0]["status"] == "ready":
                qmp_execute(vm.qmp, "job-complete", {"id": jobs[0]["id"]})
            if not jobs and vm.active_file() == vm.disks[0]:
                break
            time.sleep(0.05)
        assert overlay.exists() and vm.active_file() == vm.disks[0]
        result = converge("qmp_live_snapshot", {**args, "state": "absent"})
        assert result["changed"] is True and not overlay.exists(), result
        assert vm.reads(0x78)
    finally:
        vm.kill()


def test_next_run_replaces_an_unused_claim(fleet_dir: Path) -> None:
    """A task killed between claiming its overlay file (created empty, O_EXCL) and QEMU's transaction left an empty
    file with the overlay's name. It failed before: every later run refused ("already exists but is not part of that
    disk's chain"). A non-empty file there is still refused."""
    vm = NoOsVM(fleet_dir, "kills-claim", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        args = {"socket": str(vm.qmp), "name": "e", "mode": "external", "vmstate": False, "state": "present"}
        claim = vm.disks[0].with_name("disk0.vmsnap-e.qcow2")
        claim.write_bytes(b"x")
        refused = run_module("qmp_live_snapshot", args)
        assert refused.result and refused.result.get("failed") and "already exists" in refused.result["msg"]
        assert claim.read_bytes() == b"x" and vm.active_file() == vm.disks[0]
        claim.write_bytes(b"")
        checked = run_module("qmp_live_snapshot", {**args, "_ansible_check_mode": True})
        assert checked.result and checked.result["changed"] is True and not checked.result.get("failed")
        assert claim.exists() and claim.stat().st_size == 0
        result = converge("qmp_live_snapshot", args)
        assert result["changed"] is True and vm.active_file() == claim
        assert any("claimed and never used" in str(w) for w in result.get("warnings") or []), result
        vm.write(0x79)
        assert vm.reads(0x79)
    finally:
        vm.kill()


def test_kill_qmp_live_snapshot_external_with_ram(fleet_dir: Path) -> None:
    """The checkpoint with RAM: overlays and a state file of one instant, for one pause (stop -> overlays -> migrate
    -> cont); absent merges the overlays and deletes the state file."""
    vm = NoOsVM(fleet_dir, "kills-ram", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        sock = str(vm.qmp)
        base = {"socket": sock, "name": "c", "mode": "external", "vmstate": True}
        cycle = [
            ("qmp_live_snapshot_checkpoint_ram_present", "present"),
            ("qmp_live_snapshot_checkpoint_ram_absent", "absent"),
        ]
        windows = {label: _measure("qmp_live_snapshot", {**base, "state": state}) for label, state in cycle}

        def observe() -> tuple[t.Any, ...]:
            return (sorted(p.name for p in vm.folder.iterdir() if "vmsnap" in p.name), vm.status())

        def check() -> None:
            _settle(vm)
            vm.qemu_io("drive0", "flush")
            image = vm.active_file()
            qemu_img_check(image, shared=True)
            if _backing(image):
                qemu_img_check(Path(_backing(image) or ""), shared=True)

        files = ["disk0.vmsnap-c.qcow2", "disk0.vmsnap-c.vmstate", "disk0.vmsnap-c.vmstate.json"]
        for index in trial_indexes("qmp_live_snapshot_external_ram", 4):
            label, state = cycle[index % len(cycle)]
            pattern = 0x60 + index
            vm.write(pattern)
            target = (files if state == "present" else [], "running")
            _trial(label, index, windows[label], "qmp_live_snapshot", {**base, "state": state}, observe, check,
                   target)  # fmt: skip
            assert _vmsnap_jobs(vm) == [], f"{label}:{index}: jobs left in QEMU: {_vmsnap_jobs(vm)}"
            assert vm.reads(pattern), f"{label}:{index}: the guest does not read {pattern:#x}"
    finally:
        vm.kill()


def test_kill_qmp_vm_state_restored(fleet_dir: Path) -> None:
    """A restore into a QEMU waiting with -incoming defer: QEMU reads the file through the descriptor it was given,
    so a killed module does not stop it; the next run finds the state already restored into this process."""
    vm = NoOsVM(fleet_dir, "kills-restore", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    state = fleet_dir / "restore.vmstate"
    try:
        vm.write(0x71)
        ok_save = run_module("qmp_vm_state", {"socket": str(vm.qmp), "path": str(state), "after": "quit"})
        assert ok_save.result and ok_save.result["changed"], ok_save.result
        args = {"socket": str(vm.qmp), "path": str(state), "state": "restored"}

        def fresh() -> None:
            vm.kill()
            vm.start(["-incoming", "defer"])

        fresh()
        window = _measure("qmp_vm_state", args)

        def observe() -> str:
            return vm.status()

        def check() -> None:
            _settle(vm)
            vm.qemu_io("drive0", "flush")
            qemu_img_check(vm.disks[0], shared=True)
            assert vm.reads(0x71)

        for index in trial_indexes("qmp_vm_state_restored", 3):
            fresh()
            _trial("qmp_vm_state_restored", index, window, "qmp_vm_state", args, observe, check, "running")
    finally:
        vm.kill()


def test_kill_qcow2_backup_live(fleet_dir: Path) -> None:
    vm = NoOsVM(fleet_dir, "kills-backup", disks=1, memory_mib=64).create_disks(0xAA, "32M")
    vm.start()
    dest = fleet_dir / "backups"
    dest.mkdir()
    try:
        vm.qemu_io("drive0", "write -P 0x21 1M 8M")
        args = {"socket": str(vm.qmp), "dest_dir": str(dest)}
        window = _measure("qcow2_backup", {**args, "mode": "full"})

        def observe() -> list[str]:
            return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())

        def check() -> None:
            _settle(vm)
            vm.qemu_io("drive0", "flush")
            qemu_img_check(vm.disks[0], shared=True)
            assert vm.reads(0xAA), "the disk lost its data"

        for index in trial_indexes("qcow2_backup_live", 3):
            vm.qemu_io("drive0", f"write -P {0x80 + index:#x} {10 + index}M 1M")
            mode = "full" if index % 2 == 0 else "auto"
            _trial("qcow2_backup_live", index, window, "qcow2_backup", {**args, "mode": mode}, observe, check)
            jobs = qmp_execute(vm.qmp, "query-jobs")
            assert jobs == [], f"qcow2_backup_live:{index}: jobs left in QEMU: {jobs}"
            verified = run_module("qcow2_backup", {"dest_dir": str(dest), "set_name": "disk0", "state": "verified"})
            assert verified.result is not None and not verified.result.get("failed"), verified.result
    finally:
        vm.kill()


def test_next_run_resumes_a_guest_a_killed_task_paused(fleet_dir: Path) -> None:
    """A task killed between its stop and its cont (a state save, a revert that drops bitmaps) left the guest paused
    with its marker /objects/vmsnap-paused-<pid> in QEMU. The next run resumes it (check mode only says so); a guest
    paused by someone else (no marker, or a marker of a process that still runs) stays paused. It failed before: the
    guest stayed paused for good and nothing said why."""
    vm = NoOsVM(fleet_dir, "kills-paused", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        args = {"socket": str(vm.qmp), "name": "p", "vmstate": False}

        def objects() -> list[str]:
            return sorted(
                o["name"] for o in qmp_execute(vm.qmp, "qom-list", {"path": "/objects"}) if "vmsnap" in o["name"]
            )

        def killed_task_paused(pid: int) -> str:
            marker = f"vmsnap-paused-{pid}"
            qmp_execute(vm.qmp, "object-add", {"qom-type": "secret", "id": marker, "data": "vmsnap"})
            qmp_execute(vm.qmp, "stop")
            return marker

        marker = killed_task_paused(_dead_pid())
        checked = run_module("qmp_live_snapshot", {**args, "_ansible_check_mode": True})
        assert checked.result and not checked.result.get("failed"), checked.result
        assert "the real run resumes it first" in str(checked.result.get("warnings"))
        assert vm.status() == "paused" and objects() == [marker]
        result = converge("qmp_live_snapshot", args)
        assert result["changed"] is True and "it was resumed" in str(result.get("warnings")), result
        assert vm.status() == "running" and objects() == [] and _snapshots(vm.disks[0]) == ["p"]

        # The same with nothing else to do: resuming is the change.
        marker = killed_task_paused(_dead_pid())
        result = converge("qmp_live_snapshot", args)
        assert result["changed"] is True and vm.status() == "running" and objects() == []
        marker = killed_task_paused(_dead_pid())
        result = converge("qmp_vm_state", {"socket": str(vm.qmp), "path": str(fleet_dir / "s.vmstate")})
        assert "it was resumed" in str(result.get("warnings")), result
        assert vm.status() == "running" and objects() == []

        # Paused by someone else: left paused.
        qmp_execute(vm.qmp, "stop")
        ours = killed_task_paused(os.getpid())  # a marker whose task still runs
        result = converge("qmp_live_snapshot", {**args, "state": "absent"})
        assert result["changed"] is True and vm.status() == "paused" and objects() == [ours]
        assert _snapshots(vm.disks[0]) == []
    finally:
        vm.kill()


def test_next_run_removes_the_private_folder_of_a_run_killed_after_its_change(tmp_path: Path) -> None:
    """qcow2_chain flattened/present killed after the new image got its name but before its private folder was
    removed: the image is as requested, so the next run changes nothing, and it used to leave the folder for good
    (the kill trials found it: qcow2_chain_flattened, a kill right after the rename)."""
    import subprocess

    base, overlay = _chain(tmp_path)
    flat = tmp_path / "flat.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(overlay), str(flat)], check=True)
    leftovers = [tmp_path / ".flat.qcow2.vmsnap-flatten.tmp", tmp_path / ".top.qcow2.vmsnap-create.tmp"]
    for folder in leftovers:
        folder.mkdir(mode=0o700)
    (leftovers[0] / "flat.qcow2").write_bytes(b"")  # what a kill during the convert leaves (here: a stand-in)
    result = converge("qcow2_chain", {"path": str(flat), "state": "flattened"})
    assert result["changed"] is False and not leftovers[0].exists(), result
    result = converge("qcow2_chain", {"path": str(overlay), "backing": str(base)})
    assert result["changed"] is False and not leftovers[1].exists(), result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.qcow2", "flat.qcow2", "top.qcow2"]
    assert qemu_io_reads(flat, 0xBB, "0", "8M") and qemu_io_reads(flat, 0x11, "8M", "8M")


def test_next_run_cancels_a_killed_live_backup_job(fleet_dir: Path) -> None:
    """qcow2_backup on a running VM killed while its job copies (auto-finalize is off, so the job then waits in
    QEMU for a job-finalize that never comes) leaves the job with its copy-before-write filter on top of the disk.
    The next run used to refuse the disk ("is copy-before-write, not qcow2") before it reached its clean-up; now it
    cancels the leftover job first (the kill trials found it: qcow2_backup_live)."""
    import json
    import signal
    import subprocess
    import sys

    from kill_trials import collection_root, module_file

    vm = NoOsVM(fleet_dir, "kills-pending", disks=1, memory_mib=64).create_disks(0xAA, "64M")
    vm.start()
    dest = fleet_dir / "backups"
    dest.mkdir()
    try:
        vm.qemu_io("drive0", "write -P 0x22 1M 48M")
        args = {"socket": str(vm.qmp), "dest_dir": str(dest)}
        index = dest / "disk0" / "index.json"
        args_file = fleet_dir / "args.json"
        args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
        env = dict(os.environ, LANG="C", PYTHONPATH=str(collection_root()))
        proc = subprocess.Popen([sys.executable, str(module_file("qcow2_backup")), str(args_file)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            # The job copies into the backup's temporary file: kill once it holds some of the data.
            if any(p.stat().st_size > 4 << 20 for p in index.parent.glob("*") if p.name != index.name):
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the backup finished before it could be killed while its job ran"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        jobs = qmp_execute(vm.qmp, "query-jobs")
        assert [job["id"] for job in jobs] == ["vmsnap-backup-disk0"], jobs
        result = converge("qcow2_backup", args)
        assert result["changed"] is True
        assert "Cancelled the leftover backup job vmsnap-backup-disk0" in str(result.get("warnings")), result
        assert qmp_execute(vm.qmp, "query-jobs") == []
        assert vm.active_file() == vm.disks[0] and vm.reads(0xAA)
        verified = run_module("qcow2_backup", {"dest_dir": str(dest), "set_name": "disk0", "state": "verified"})
        assert verified.result is not None and not verified.result.get("failed"), verified.result
    finally:
        vm.kill()


def test_next_run_retakes_a_checkpoint_with_ram_whose_task_was_killed(fleet_dir: Path) -> None:
    """An external checkpoint with RAM killed after its overlays and before its state file was renamed into place:
    overlays, no state file, the killed task's temporary state file beside it. The next run used to refuse it ("has
    its overlays, but no RAM state file") for good; now it merges the overlays back (the RAM of their instant is lost)
    and takes the checkpoint again. Without the killed task's temporary file it still refuses (found by the kill
    trials: qmp_live_snapshot_checkpoint_ram_present)."""
    vm = NoOsVM(fleet_dir, "kills-half", disks=1, memory_mib=64).create_disks(0xAA, "16M")
    vm.start()
    try:
        base = {"socket": str(vm.qmp), "name": "c", "mode": "external"}
        assert ok_run("qmp_live_snapshot", {**base, "vmstate": False})["changed"]
        vm.write(0x91)  # into the overlay
        state = vm.folder / "disk0.vmsnap-c.vmstate"
        refused = run_module("qmp_live_snapshot", {**base, "vmstate": True})
        assert refused.result and refused.result.get("failed") and "no RAM state file" in refused.result["msg"]
        temp = vm.folder / f".disk0.vmsnap-c.vmstate.vmsnap-tmp-{_dead_pid()}-17"
        temp.write_bytes(b"QEVM")
        checked = run_module("qmp_live_snapshot", {**base, "vmstate": True, "_ansible_check_mode": True})
        assert checked.result and checked.result["changed"] is True and not checked.result.get("failed")
        assert "The real run merges the overlays back" in str(checked.result.get("warnings"))
        assert vm.active_file().name == "disk0.vmsnap-c.qcow2" and temp.exists()
        result = converge("qmp_live_snapshot", {**base, "vmstate": True})
        assert result["changed"] is True and "took the checkpoint again" in str(result.get("warnings")), result
        names = sorted(p.name for p in vm.folder.iterdir() if "vmsnap" in p.name)
        assert names == ["disk0.vmsnap-c.qcow2", "disk0.vmsnap-c.vmstate", "disk0.vmsnap-c.vmstate.json"], names
        assert state.stat().st_size > 0 and vm.status() == "running" and vm.reads(0x91)
        assert _backing(vm.active_file()) == str(vm.disks[0]) and qemu_io_reads(vm.disks[0], 0x91)
    finally:
        vm.kill()


def ok_run(module: str, args: dict[str, t.Any]) -> dict[str, t.Any]:
    run = run_module(module, args)
    assert run.result is not None and not run.result.get("failed"), run.result
    return run.result


def test_killed_offline_incremental_leaves_the_disk_clean(tmp_path: Path) -> None:
    """qcow2_backup offline incremental killed while its helper qemu-storage-daemon copies: the daemon (which has the
    disk open read-write for its bitmaps) quits with its parent, so qemu-img check finds nothing wrong with the disk
    and the next run takes a full backup that verifies. (A kill trial once found two leaked clusters in the disk after
    a kill near the end of an incremental, when the daemon got SIGKILL with its parent; it now gets SIGTERM and closes
    the disk as on quit. This test kills mid-copy, where the old SIGKILL left the disk clean too: it does not
    reproduce that trial.)"""
    import json
    import signal
    import subprocess
    import sys

    from kill_trials import collection_root, module_file

    image, dest = tmp_path / "disk.qcow2", tmp_path / "backups"
    dest.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "96M"], check=True)
    qemu_io_write(image, 0xAA, "0", "1M")
    args = {"path": str(image), "dest_dir": str(dest)}
    ok_run("qcow2_backup", args)
    qemu_io_write(image, 0x33, "1M", "64M")  # the incremental has 64 MiB to copy
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    env = dict(os.environ, LANG="C", PYTHONPATH=str(collection_root()))
    proc = subprocess.Popen([sys.executable, str(module_file("qcow2_backup")), str(args_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 60
    folder = dest / "disk"
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.stat().st_size > 8 << 20 for p in folder.glob(".tmp-*")):
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the incremental ended before it could be killed while copying"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the helper daemon outlived its module by 30 s"
        time.sleep(0.02)
    qemu_img_check(image)
    assert qemu_io_reads(image, 0x33, "1M", "64M")
    again = converge("qcow2_backup", args)
    assert again["changed"] is True
    verified = run_module("qcow2_backup", {"dest_dir": str(dest), "set_name": "disk", "state": "verified"})
    assert verified.result is not None and all(v["ok"] for v in verified.result["verified"]), verified.result
