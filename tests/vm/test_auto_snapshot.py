# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The auto_snapshot role and playbook on real VMs without a guest OS and plain qcow2 files: the units and cron file
the role installs (systemd-analyze verify), the installed command line run for real in status mode, and the playbook
over several faked days (vmsnap_auto_now): live and offline snapshots, pruning per label, guards, dry run."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import typing as t
from pathlib import Path

from fleet import REPO, VENV_BIN, NoOsVM, run_playbook, snapshot_names, write_inventory

AUTO = Path(__file__).resolve().parent / "auto"
DAY0 = dt.datetime(2026, 12, 10, 2, 0, 0, tzinfo=dt.timezone.utc)
MANUAL = ["pre-upgrade", "auto-hourly-20261209T010000Z", "auto-daily-20261209T010000Z-keep", "auto-daily-manual"]


def at(days: float, hours: float = 0) -> int:
    return int((DAY0 + dt.timedelta(days=days, hours=hours)).timestamp())


def snap(epoch: int, label: str = "daily") -> str:
    return f"auto-{label}-{dt.datetime.fromtimestamp(epoch, dt.timezone.utc):%Y%m%dT%H%M%SZ}"


def seed(disk: Path, *names: str) -> None:
    for name in names:
        subprocess.run(["qemu-img", "snapshot", "-c", name, str(disk)], check=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summary(stdout: str) -> dict[str, str]:
    """The summary lines of a run, per VM."""
    start = stdout.index("TASK [vmsnap.qemu.auto_snapshot : Summary of label")
    body = stdout.index("=> {", start) + len("=> ")
    lines = json.loads(stdout[body : stdout.index("\n}\n", body) + 2])["msg"]
    return {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines}


def run_auto(inventory: Path, settings: dict[str, t.Any], *extra: str) -> subprocess.CompletedProcess[str]:
    path = inventory.with_name(f"settings-{len(list(inventory.parent.glob('settings-*')))}.json")
    path.write_text(json.dumps(settings))
    return run_playbook("vmsnap.qemu.auto_snapshot", inventory, "-e", f"@{path}", *extra)


@contextlib.contextmanager
def full_tmpfs(folder: Path) -> t.Iterator[Path]:
    """A 4 MiB tmpfs with under 10% free, holding a small qcow2 image."""
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "vmsnap-auto-test", str(folder)], check=True)
    try:
        image = folder / "full1.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
        stat = os.statvfs(folder)
        (folder / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 256 * 1024))
        yield image
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_playbook_over_faked_days(fleet_dir: Path) -> None:
    """Day 0: live and offline snapshots with pruning, exclusions, a socket that is down (offline through its disks),
    one without disks, a too full file system and a VM that fails (the others go on, the run fails naming it).
    Day 1: the next snapshots and pruning, and backups of both. Day 2: a dry run with only_running plans and changes
    nothing."""
    live = NoOsVM(fleet_dir, "live1", disks=2).create_disks()
    down = NoOsVM(fleet_dir, "down1").create_disks()
    spare = fleet_dir / "excl1.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(spare), "8M"], check=True)
    old_live = [snap(at(-5)), snap(at(-4)), snap(at(-2, -1)), snap(at(-2, 1)), snap(at(-1))]
    old_down = [snap(at(-4)), snap(at(-3)), snap(at(-2)), snap(at(-1))]
    for disk in live.disks:
        seed(disk, *MANUAL, *old_live)
    seed(down.disks[0], *MANUAL, *old_down)
    live.start()
    down.start()
    down.kill()  # a crashed QEMU: its socket file stays and refuses connections
    assert down.qmp.exists()
    inventory = write_inventory(fleet_dir / "inventory.yml", {}, {"localhost": {}})
    vms = [
        {"name": "live1", "qmp_socket": str(live.qmp)},
        {"name": "excl1", "disks": [str(spare)]},
        {"name": "broken1", "disks": [str(fleet_dir / "missing.qcow2")]},
        {"name": "down1", "qmp_socket": str(down.qmp), "disks": [str(down.disks[0])]},
        {"name": "nodisks1", "qmp_socket": str(fleet_dir / "nothing.sock")},
        {"name": "spare2", "disks": [str(spare)], "exclude": True},
    ]
    base = {"vmsnap_auto_retention": {"keep_daily": 3}, "vmsnap_auto_exclude": ["excl?"]}
    bad = run_auto(inventory, {**base, "vmsnap_auto_vms": [*vms, {"name": "nothing1"}], "vmsnap_auto_label": "a b"})
    assert bad.returncode != 0
    assert "vmsnap_auto_label must be letters, digits, '_' or '-' (got 'a b')" in bad.stdout, bad.stdout
    assert "Start the record of VM" not in bad.stdout
    assert snapshot_names(live.disks[0]) == [*MANUAL, *old_live]
    with contextlib.ExitStack() as stack:
        if os.geteuid() == 0:
            full = stack.enter_context(full_tmpfs(fleet_dir / "tmpfs"))
            vms.append({"name": "full1", "disks": [str(full)]})
        settings = {**base, "vmsnap_auto_vms": vms, "vmsnap_auto_min_free_percent": 10}
        day0 = run_auto(inventory, settings, "-e", f"vmsnap_auto_now={at(0)}")
        lines = summary(day0.stdout)
        if os.geteuid() == 0:
            assert lines["full1"].startswith("skipped: too little free space:"), lines
            assert "% free on " + str(fleet_dir / "tmpfs") in lines["full1"], lines
            assert snapshot_names(full) == []
    assert day0.returncode != 0, day0.stdout
    assert "broken1: FAILED at 'Free space of the file systems that hold the disks'" in day0.stdout
    assert lines["broken1"].startswith("FAILED"), lines
    assert lines["excl1"] == "skipped: excluded by vmsnap_auto_exclude (excl?)"
    assert lines["spare2"] == "skipped: excluded (exclude: true)"
    # Listed, its QEMU gone and no disks: it cannot be snapshotted, which fails it (not a silent skip).
    assert lines["nodisks1"].startswith("FAILED"), lines
    assert f"the QMP socket {fleet_dir / 'nothing.sock'} does not answer" in lines["nodisks1"], lines
    assert snapshot_names(spare) == []
    new0 = snap(at(0))
    gone = ", ".join(sorted([snap(at(-5)), snap(at(-4)), snap(at(-2, -1))]))
    assert lines["live1"] == f"took {new0} (live, 2 disks); deleted {gone}", lines
    assert lines["down1"] == f"took {new0} (offline, 1 disk); deleted {snap(at(-4))}, {snap(at(-3))}", lines
    # keep_daily 3: the newest of each of the three newest days; nothing else of the label is touched.
    for disk in live.disks:
        assert snapshot_names(disk) == [*MANUAL, snap(at(-2, 1)), snap(at(-1)), new0]
    assert snapshot_names(down.disks[0]) == [*MANUAL, snap(at(-2)), snap(at(-1)), new0]

    backups = fleet_dir / "backups"
    backups.mkdir()
    base["vmsnap_auto_backup"] = {"dest_dir": str(backups), "retention": {"keep": 2}}
    day1 = run_auto(inventory, {**base, "vmsnap_auto_vms": [vms[0], vms[3]]}, "-e", f"vmsnap_auto_now={at(1)}")
    assert day1.returncode == 0, day1.stdout
    lines = summary(day1.stdout)
    backup_id = "[0-9]{8}T[0-9]{6}Z"
    assert re.fullmatch(
        f"took {snap(at(1))} \\(live, 2 disks\\); deleted {snap(at(-2, 1))}; "
        f"backed up disk0 full {backup_id}, disk1 full {backup_id}",
        lines["live1"],
    ), lines
    assert re.fullmatch(
        f"took {snap(at(1))} \\(offline, 1 disk\\); deleted {snap(at(-2))}; backed up disk0 full {backup_id}",
        lines["down1"],
    ), lines
    for disk in live.disks:
        assert snapshot_names(disk) == [*MANUAL, snap(at(-1)), new0, snap(at(1))]
    assert snapshot_names(down.disks[0]) == [*MANUAL, snap(at(-1)), new0, snap(at(1))]
    indexes = [
        backups / "live1/disk0/index.json",
        backups / "live1/disk1/index.json",
        backups / "down1/disk0/index.json",
    ]
    for index in indexes:
        assert [backup["mode"] for backup in json.loads(index.read_text())["backups"]] == ["full"], index

    # Day 2: a dry run that would also back up, with only_running (the stopped VM is skipped).
    images = [*live.disks, down.disks[0]]

    def state() -> tuple[dict[Path, tuple[str, list[str]]], list[str]]:
        return {image: (sha256(image), snapshot_names(image)) for image in images}, [sha256(i) for i in indexes]

    before = state()
    day2 = run_auto(
        inventory,
        {**base, "vmsnap_auto_vms": [vms[0], vms[3]], "vmsnap_auto_dry_run": True, "vmsnap_auto_only_running": True},
        "-e",
        f"vmsnap_auto_now={at(2)}",
    )
    assert day2.returncode == 0, day2.stdout
    lines = summary(day2.stdout)
    assert lines["live1"].startswith(
        f"would take {snap(at(2))} (live, 2 disks); would delete {snap(at(-1))}; would back up disk0 "
    ), lines
    assert lines["down1"] == "skipped: not running (QEMU is down) and vmsnap_auto_only_running is set"
    assert state() == before
    assert live.running()

    # The same as ansible-playbook --check, without vmsnap_auto_dry_run, also for the stopped VM (offline).
    settings = {**base, "vmsnap_auto_vms": [vms[0], vms[3]]}
    checked = run_auto(inventory, settings, "--check", "-e", f"vmsnap_auto_now={at(2)}")
    assert checked.returncode == 0, checked.stdout
    lines = summary(checked.stdout)
    assert lines["live1"].startswith(f"would take {snap(at(2))} (live, 2 disks); would delete {snap(at(-1))}"), lines
    assert lines["down1"].startswith(f"would take {snap(at(2))} (offline, 1 disk)"), lines
    assert state() == before


def _unit_env(unit: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in unit.splitlines():
        if line.startswith("Environment="):
            for assignment in shlex.split(line[len("Environment=") :]):
                key, value = assignment.split("=", 1)
                env[key] = value
    return env


def test_role_installs_runs_and_removes(tmp_path: Path) -> None:
    """daily through systemd (units pass systemd-analyze verify, and the installed command line run for real in
    status mode flags a stale VM and exits non-zero), hourly through cron, an untranslatable cron schedule refused
    before anything is written, and state absent removing everything."""
    images = {name: tmp_path / f"{name}.qcow2" for name in ("fresh1", "stale1", "none1")}
    for image in images.values():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    seed(images["fresh1"], snap(at(-3)), snap(at(0, -1)), "pre-upgrade")
    seed(images["stale1"], snap(at(-3)), snap(at(0, -1), "hourly"), "auto-daily-20261210T000000Z-x")
    live = NoOsVM(tmp_path, "live2").create_disks()
    seed(live.disks[0], snap(at(-1)), snap(at(0, -2)))
    live.start()
    try:
        _install_run_remove(tmp_path, images, live)
    finally:
        live.kill()


def _install_run_remove(tmp_path: Path, images: dict[str, Path], live: NoOsVM) -> None:
    folders = {name: tmp_path / name for name in ("etc", "systemd", "cron")}
    for folder in (folders["systemd"], folders["cron"]):
        folder.mkdir()
    vms = [{"name": name, "disks": [str(image)]} for name, image in images.items()]
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "vmsnap_auto_config_dir": str(folders["etc"]),
                "vmsnap_auto_systemd_dir": str(folders["systemd"]),
                "vmsnap_auto_cron_dir": str(folders["cron"]),
                "vmsnap_auto_manage_service": False,
                "vmsnap_auto_ansible_playbook": str(VENV_BIN / "ansible-playbook"),
                "vmsnap_auto_collections_path": os.environ.get("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src")),
                "vmsnap_auto_vms": [*vms, {"name": "live2", "qmp_socket": str(live.qmp)}],
            }
        )
    )
    inventory = write_inventory(tmp_path / "inventory.yml", {}, {"localhost": {}})
    installed = run_playbook(str(AUTO / "install.yml"), inventory, "-e", f"@{settings}")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "REFUSED:" in installed.stdout and "set vmsnap_auto_cron_schedule" in installed.stdout
    assert not (folders["etc"] / "auto_snapshot-weekdays.yml").exists()
    assert not (folders["cron"] / "vmsnap-auto-snapshot-weekdays").exists()

    assert oct(folders["etc"].stat().st_mode & 0o777) == "0o700"
    assert sorted(p.name for p in folders["etc"].iterdir()) == ["auto_snapshot-daily.yml", "auto_snapshot-hourly.yml"]
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in folders["etc"].iterdir())
    service = folders["systemd"] / "vmsnap-auto-snapshot-daily.service"
    timer = folders["systemd"] / "vmsnap-auto-snapshot-daily.timer"
    assert sorted(p.name for p in folders["systemd"].iterdir()) == [service.name, timer.name]
    assert "OnCalendar=*-*-* 02:00:00\nPersistent=true\nRandomizedDelaySec=15min\n" in timer.read_text()
    verify = shutil.which("systemd-analyze")
    if verify:
        checked = subprocess.run(
            [verify, "verify", str(service), str(timer)], capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    cron = (folders["cron"] / "vmsnap-auto-snapshot-hourly").read_text()
    assert (
        f"\n15 * * * * root '{VENV_BIN / 'ansible-playbook'}' -i localhost, -c local vmsnap.qemu.auto_snapshot "
        f"-e '@{folders['etc'] / 'auto_snapshot-hourly.yml'}'\n" in cron
    ), cron

    # What the timer would start, run now in status mode with a faked clock.
    unit = service.read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))[len("ExecStart=") :]
    argv = shlex.split(exec_start) + ["-e", "vmsnap_auto_mode=status", "-e", f"vmsnap_auto_now={at(0)}"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    status = subprocess.run(
        argv, capture_output=True, text=True, env={**env, **_unit_env(unit)}, timeout=300, check=False
    )
    assert status.returncode != 0, status.stdout + status.stderr
    lines = summary(status.stdout)
    assert lines == {
        "fresh1": f"ok: newest {snap(at(0, -1))} is 1.0 h old",
        "stale1": f"STALE: newest {snap(at(-3))} is 72.0 h old, older than 2d",
        "none1": "STALE: no snapshot of label daily",
        "live2": f"ok: newest {snap(at(0, -2))} is 2.0 h old",
    }, lines
    assert "2 of 4 VMs: stale1: STALE" in status.stdout

    removed = run_playbook(str(AUTO / "install.yml"), inventory, "-e", f"@{settings}", "-e", "vmsnap_auto_state=absent")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert [p.name for p in folders["systemd"].iterdir()] == []
    assert [p.name for p in folders["cron"].iterdir()] == []
    assert [p.name for p in folders["etc"].iterdir()] == []
