# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""make examples: runs every playbook in examples/ against real VMs and checks what each one says it does.

The playbooks run as a user would run them, `ansible-playbook -i examples/inventory.yml examples/<x>.yml`, plus a
second, generated inventory that points vm_dir and run_dir at a scratch folder, uses TCG and small RAM, and gives db01
the tiny real Linux guest of tests/vm (kernel, initrd; it runs qemu-guest-agent). web01 is a VM without a guest OS:
its examples need only QMP. The VMs are started by examples/start_vms.yml from the inventory's own QEMU command line.
Results are checked from outside: qemu-img/qemu-io data patterns and snapshot lists, files, the guest's own view
through its agent. An example file that this runner does not run makes it fail.

Usage: ANSIBLE_COLLECTIONS_PATH=build/src .venv/bin/python tests/examples/run_examples.py [--keep]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import typing as t
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
COLLECTIONS = os.environ.get("ANSIBLE_COLLECTIONS_PATH") or str(REPO / "build" / "src")
sys.path.insert(0, str(REPO / "tests" / "vm"))
sys.path.insert(0, COLLECTIONS.split(":")[0])

from tiny_guest import build_tiny_guest, default_cache_dir, make_ext4_qcow2, run_in_guest  # noqa: E402

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError  # noqa: E402
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient  # noqa: E402

ANSIBLE_PLAYBOOK = Path(os.environ.get("VMSNAP_ANSIBLE_PLAYBOOK") or REPO / ".venv" / "bin" / "ansible-playbook")
BOOT_SECONDS = 90.0

# Every playbook in examples/. The scenario runs them in two chains side by side (db01's and the others), in this
# order within each chain.
COVERED = (
    "offline_checkpoint.yml",
    "offline_rollback.yml",
    "offline_nightly.yml",
    "overlay_checkpoint.yml",
    "overlay_commit.yml",
    "start_vms.yml",
    "test_overlays.yml",
    "test_overlays_drop.yml",
    "live_checkpoint.yml",
    "live_rollback.yml",
    "guest_commands.yml",
    "live_nightly.yml",
    "live_merge.yml",
    "ram_checkpoint.yml",
    "ram_rollback.yml",
    "ram_release.yml",
    "backup_nightly.yml",
    "backup_restore.yml",
    "pre_upgrade.yml",
    "auto_snapshot.yml",
)


class ExampleFailed(Exception):
    def __init__(self, example: str, message: str) -> None:
        super().__init__(f"{example}: {message}")
        self.example = example
        self.message = message


class Runner:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.vm_dir = work / "vms"
        self.run_dir = work / "run"
        self.backup_dir = work / "backups"
        self.inventory = work / "test-inventory.yml"
        self.ran: list[str] = []
        self._where = threading.local()  # the example each chain is at

    # -- plumbing -------------------------------------------------------------------------------------------------

    @property
    def current(self) -> str:
        return getattr(self._where, "example", "(setup)")

    @current.setter
    def current(self, example: str) -> None:
        self._where.example = example

    def fail(self, message: str) -> t.NoReturn:
        raise ExampleFailed(self.current, message)

    def in_parallel(self, *chains: t.Callable[[], None]) -> None:
        """Independent chains of examples side by side (2 cores); every failure of every chain is reported."""
        with concurrent.futures.ThreadPoolExecutor(len(chains)) as pool:
            futures = [pool.submit(self.naming_failures, chain) for chain in chains]
        failures = [f.exception() for f in futures if f.exception() is not None]
        for failure in failures[1:]:
            print(f"FAILED example examples/{getattr(failure, 'example', '?')}: {failure}", file=sys.stderr)
        if failures:
            raise failures[0]  # type: ignore[misc]

    def naming_failures(self, chain: t.Callable[[], None]) -> None:
        """Any error (a helper's, QEMU's, the guest's) becomes a failure of the example the chain was at."""
        try:
            chain()
        except ExampleFailed:
            raise
        except Exception as exc:  # reported with the example's name, traceback included
            trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            raise ExampleFailed(self.current, trace) from exc

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            self.fail(message)

    def playbook(self, name: str, *args: str, exit_code: int = 0) -> str:
        """Run examples/<name> with both inventories; return its output (failing the example when Ansible exits
        with another code than exit_code)."""
        self.current = name
        env = dict(
            os.environ,
            ANSIBLE_COLLECTIONS_PATH=COLLECTIONS,
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_FORCE_COLOR="0",
            ANSIBLE_RETRY_FILES_ENABLED="0",
            ANSIBLE_PIPELINING="1",  # faster; the examples do not depend on it
            LANG="C.UTF-8",
        )
        argv = [str(ANSIBLE_PLAYBOOK), "-i", str(EXAMPLES / "inventory.yml"), "-i", str(self.inventory)]
        argv += [*args, str(EXAMPLES / name)]
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
        if proc.returncode != exit_code:
            self.fail(f"ansible-playbook exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        self.ran.append(name)
        print(f"  ran   {name} ({time.monotonic() - started:.1f} s)", flush=True)
        return proc.stdout

    def write_inventory(self, kernel: Path, initrd: Path) -> None:
        """The test's inventory: only paths, accelerator, RAM and db01's kernel differ from examples/inventory.yml."""
        tiny_guest = ["-kernel", str(kernel), "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1 quiet"]
        tiny_guest += ["-serial", f"file:{self.work / 'db01-console.log'}"]
        inventory = {
            "all": {
                "vars": {
                    "vm_dir": str(self.vm_dir),
                    "run_dir": str(self.run_dir),
                    "backup_dir": str(self.backup_dir),
                    "qemu_accel": "tcg",
                },
                "children": {
                    "guests": {
                        "hosts": {
                            "web01": {"vm_memory_mib": 128},
                            "db01": {"vm_memory_mib": 128, "vm_qemu_extra_args": tiny_guest},
                        }
                    }
                },
            }
        }
        self.inventory.write_text(json.dumps(inventory, indent=2) + "\n")  # JSON is YAML

    def disk(self, name: str) -> Path:
        return self.vm_dir / name

    # -- outside views of images and VMs ----------------------------------------------------------------------------

    def qemu_io(self, image: Path, command: str, *, shared: bool = False) -> None:
        """One qemu-io command on an image; `read -P` fails the example when the pattern does not match."""
        argv = ["qemu-io", "-f", "qcow2"] + (["-r", "-U"] if shared else [])
        argv += (["-r"] if command.startswith("read") and not shared else []) + ["-c", command, str(image)]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or "Pattern verification failed" in proc.stdout or "error" in proc.stdout.lower():
            self.fail(f"qemu-io {command!r} on {image}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}")

    def info(self, image: Path, *, shared: bool = False) -> dict[str, t.Any]:
        argv = ["qemu-img", "info", "--output=json"] + (["-U"] if shared else []) + [str(image)]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            self.fail(f"qemu-img info {image}: {proc.stderr}")
        return t.cast("dict[str, t.Any]", json.loads(proc.stdout))

    def snapshots(self, image: Path, *, shared: bool = False) -> list[str]:
        return [s["name"] for s in self.info(image, shared=shared).get("snapshots", [])]

    def hmp_write(self, qmp_socket: Path, drive: str, pattern: int, offset_mib: int) -> None:
        """A guest-visible write through the running QEMU (HMP qemu-io), as if web01's guest wrote it."""
        line = f'qemu-io {drive} "write -P {pattern:#x} {offset_mib}M 1M"'
        with QmpClient(str(qmp_socket), connect_timeout=5, command_timeout=30) as qmp:
            out = qmp.execute("human-monitor-command", {"command-line": line})
        self.check(not str(out).strip(), f"HMP {line}: {out}")

    def vm_status(self, qmp_socket: Path) -> str:
        with QmpClient(str(qmp_socket), connect_timeout=5, command_timeout=30) as qmp:
            return str(qmp.execute("query-status")["status"])

    def in_guest(self, qga_socket: Path, command: str, connect_timeout: float = 5.0) -> tuple[int, str]:
        """Run a shell command inside db01 through its guest agent; (exit status, output)."""
        try:
            return run_in_guest(qga_socket, command, connect_timeout, timeout=30)
        except RuntimeError as exc:
            self.fail(f"inside the guest: {exc}")

    def guest_ok(self, command: str) -> str:
        code, out = self.in_guest(self.run_dir / "db01.qga", command)
        self.check(code == 0, f"{command!r} failed inside db01 ({code}): {out}")
        return out

    def wait_for_agent(self) -> None:
        deadline = time.monotonic() + BOOT_SECONDS
        while True:
            with contextlib.suppress(VmsnapError, OSError):
                if self.in_guest(self.run_dir / "db01.qga", "grep -q ' /mnt/data ' /proc/mounts", 2)[0] == 0:
                    return
            if time.monotonic() > deadline:
                self.fail(f"db01's guest agent did not answer within {BOOT_SECONDS:g} s (see the console log)")
            time.sleep(0.5)

    def stop_vms(self) -> None:
        """SIGTERM the QEMUs this run started (by their PID files) and wait until they are gone."""
        pids = []
        for pidfile in self.run_dir.glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if f"-pidfile\0{pidfile}\0".encode() in cmdline:  # our QEMU, not a reused PID
                    os.kill(pid, signal.SIGTERM)
                    pids.append(pid)
        deadline = time.monotonic() + 30
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
            time.sleep(0.05)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pidfile in self.run_dir.glob("*.pid"):  # QEMU removes it last on exit
            for dummy in range(200):
                if not pidfile.exists():
                    break
                time.sleep(0.05)

    # -- the scenario ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        self.vm_dir.mkdir(parents=True)
        self.run_dir.mkdir()
        self.backup_dir.mkdir()
        image = build_tiny_guest(default_cache_dir())
        self.write_inventory(image.kernel, image.initrd)
        db_system, db_data = self.disk("db01-system.qcow2"), self.disk("db01-data.qcow2")
        web, golden = self.disk("web01.qcow2"), self.disk("golden.qcow2")
        make_ext4_qcow2(db_system, size_mib=64)  # the tiny guest mounts its first disk
        for path in (db_data, web, golden):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)

        def offline_db01() -> None:
            self.offline_db(db_system, db_data)
            self.overlay_checkpoint(db_data)

        def offline_others() -> None:
            self.nightly(web)
            self.test_overlays(golden)

        def live_db01() -> None:
            self.current = "start_vms.yml"
            self.wait_for_agent()
            out = self.playbook("guest_commands.yml", "--limit", "db01")  # web01 has no guest OS, hence no agent
            self.check("cloud-amd64" in out, f"the guest's kernel release is not in the output:\n{out}")
            self.live_db(db_system, db_data)
            self.pre_upgrade()

        def live_web01() -> None:
            self.live_web(web)
            self.ram(web)
            self.backups(web)

        self.in_parallel(offline_db01, offline_others)
        self.playbook("start_vms.yml")
        self.check(self.vm_status(self.run_dir / "web01.qmp") == "running", "web01 does not run")
        self.in_parallel(live_db01, live_web01)
        self.auto_snapshot(web, db_system, db_data)
        self.stop_vms()
        self.final_offline(web, db_system, db_data)

    def pre_upgrade(self) -> None:
        """The README's opening example: db01's upgrade breaks its application, so it is rolled back and released."""
        self.guest_ok(
            "mkdir -p /mnt/data/app /run/app && echo 1.0 > /mnt/data/app/VERSION && echo healthy > /mnt/data/app/STATE"
            " && echo sessions=42 > /run/app/sessions && grep -q ' /run tmpfs ' /proc/mounts && sync"
        )
        manifests, report = self.work / "manifests", self.work / "pre_upgrade-report.json"
        out = self.playbook(
            "pre_upgrade.yml", "-e", "vmsnap_targets=db01", "-e", "app_upgrade_breaks=true",
            "-e", f"vmsnap_manifest_dir={manifests}", "-e", f"vmsnap_report={report}", exit_code=2,
        )  # fmt: skip
        guest = json.loads(report.read_text())["guests"]["db01"]
        self.check(guest["outcome"] == "rolled back" and guest["released"], f"db01's report line: {guest}\n{out}")
        self.check("db01 on hypervisor: ROLLED BACK" in out, f"no summary line for db01:\n{out}")
        self.wait_for_agent()
        # The files on disk read from the disk, the sessions from RAM: both as at the checkpoint's instant.
        files = self.guest_ok(
            "sync; echo 3 > /proc/sys/vm/drop_caches; cat /mnt/data/app/VERSION /mnt/data/app/STATE /run/app/sessions"
        )
        self.check(files.split() == ["1.0", "healthy", "sessions=42"], f"db01's app after the rollback: {files!r}")
        manifest = json.loads((manifests / "db01" / "pre-upgrade.json").read_text())
        self.check(manifest["state"] == "released" and manifest["method"] == "external", f"manifest: {manifest}")
        self.check(not list(self.vm_dir.glob("db01*.vmsnap-pre-upgrade.*")), "the checkpoint's files are left over")

    def offline_db(self, db_system: Path, db_data: Path) -> None:
        self.qemu_io(db_data, "write -P 0x11 0 1M")
        self.playbook("offline_checkpoint.yml")
        for disk in (db_system, db_data):
            self.check(self.snapshots(disk) == ["pre-upgrade"], f"{disk.name}: snapshots {self.snapshots(disk)}")
        self.qemu_io(db_data, "write -P 0x22 0 1M")  # the upgrade
        self.playbook("offline_rollback.yml")
        self.qemu_io(db_data, "read -P 0x11 0 1M")

    def nightly(self, web: Path) -> None:
        for day in range(1, 9):  # eight older nightlies; the example keeps the newest seven
            subprocess.run(["qemu-img", "snapshot", "-c", f"auto-2020010{day}T000000Z", str(web)], check=True)
        time.sleep(1.1)  # qcow2 snapshot dates have one-second resolution: the new one must be the newest
        self.playbook("offline_nightly.yml")
        names = self.snapshots(web)
        new = [n for n in names if n.startswith("auto-") and not n.startswith("auto-2020")]
        self.check(len(names) == 7 and len(new) == 1, f"web01.qcow2 should keep 7 nightlies, 1 of them new: {names}")

    def test_overlays(self, golden: Path) -> None:
        self.qemu_io(golden, "write -P 0x5a 0 1M")
        before = self.info(golden)
        self.playbook("test_overlays.yml")
        tests = [self.disk(f"test-{n}.qcow2") for n in (1, 2)]
        for overlay in tests:
            self.check(self.info(overlay).get("backing-filename") == str(golden), f"{overlay.name} is not on golden")
            self.qemu_io(overlay, "read -P 0x5a 0 1M")  # the test sees the golden data
        self.qemu_io(tests[0], "write -P 0xa5 0 1M")  # a test writes
        self.qemu_io(tests[1], "read -P 0x5a 0 1M")  # the other one does not see it
        self.playbook("test_overlays_drop.yml")
        self.check(not any(p.exists() for p in tests), "the test overlays are still there")
        self.qemu_io(golden, "read -P 0x5a 0 1M")
        self.check(self.info(golden) == before, "the golden image changed")

    def overlay_checkpoint(self, db_data: Path) -> None:
        self.playbook("overlay_checkpoint.yml")
        overlay = self.disk("db01-data-pre-upgrade.qcow2")
        self.check(self.info(overlay).get("backing-filename") == str(db_data), f"{overlay.name} is not on db01-data")
        self.check(self.disk("db01-system-pre-upgrade.qcow2").exists(), "db01-system has no overlay")
        self.qemu_io(overlay, "write -P 0x33 1M 1M")  # the VM ran on the overlays
        self.qemu_io(db_data, "read -P 0 1M 1M")
        self.playbook("overlay_commit.yml")
        self.check(not list(self.vm_dir.glob("*-pre-upgrade.qcow2")), "overlays left after the commit")
        self.qemu_io(db_data, "read -P 0x33 1M 1M")
        self.qemu_io(db_data, "read -P 0x11 0 1M")

    def live_web(self, web: Path) -> None:
        qmp = self.run_dir / "web01.qmp"
        self.hmp_write(qmp, "virtio0", 0x44, 0)
        self.playbook("live_checkpoint.yml")
        self.check("pre-upgrade" in self.snapshots(web, shared=True), "no pre-upgrade snapshot on web01.qcow2")
        self.hmp_write(qmp, "virtio0", 0x55, 0)  # the upgrade
        self.qemu_io(web, "read -P 0x55 0 1M", shared=True)
        self.playbook("live_rollback.yml")
        self.check(self.vm_status(qmp) == "running", "web01 does not run after the rollback")
        self.qemu_io(web, "read -P 0x44 0 1M", shared=True)

    def live_db(self, db_system: Path, db_data: Path) -> None:
        self.guest_ok("echo before > /mnt/data/nightly.txt && sync")
        self.playbook("live_nightly.yml")
        overlays = [self.disk("db01-system.vmsnap-nightly.qcow2"), self.disk("db01-data.vmsnap-nightly.qcow2")]
        for overlay, base in zip(overlays, (db_system, db_data)):
            backing = self.info(overlay, shared=True).get("backing-filename")
            self.check(backing == str(base), f"{overlay.name}: backing file {backing}")
        self.guest_ok("echo after >> /mnt/data/nightly.txt && sync")  # lands in the overlay
        self.playbook("live_merge.yml")
        self.check(not any(p.exists() for p in overlays), "the nightly overlays are still there")
        out = self.guest_ok("sync; echo 3 > /proc/sys/vm/drop_caches; cat /mnt/data/nightly.txt")
        self.check(out.split() == ["before", "after"], f"nightly.txt in the guest after the merge: {out!r}")

    def ram(self, web: Path) -> None:
        qmp = self.run_dir / "web01.qmp"
        state = self.disk("web01.vmsnap-pre-upgrade.vmstate")
        overlay = self.disk("web01.vmsnap-pre-upgrade.qcow2")
        self.hmp_write(qmp, "virtio0", 0x66, 1)
        self.playbook("ram_checkpoint.yml")
        self.check(state.exists() and Path(f"{state}.json").exists(), "no state file with its sidecar")
        self.check(self.info(overlay, shared=True).get("backing-filename") == str(web), "no overlay on web01.qcow2")
        self.hmp_write(qmp, "virtio0", 0x77, 1)  # the upgrade, into the overlay
        pid_before = int((self.run_dir / "web01.pid").read_text())
        self.playbook("ram_rollback.yml")
        pid_after = int((self.run_dir / "web01.pid").read_text())
        self.check(pid_after != pid_before and not Path(f"/proc/{pid_before}").exists(), "the old QEMU still runs")
        self.check(self.vm_status(qmp) == "running", "web01 does not run after the rollback")
        self.check(self.info(overlay, shared=True).get("backing-filename") == str(web), "no new overlay")
        self.qemu_io(overlay, "read -P 0x66 1M 1M", shared=True)  # the checkpoint's data, not the upgrade's
        self.hmp_write(qmp, "virtio0", 0x88, 2)  # the guest runs on, into the new overlay
        self.playbook("ram_release.yml")
        self.check(not state.exists() and not overlay.exists(), "state file or overlay left after the release")
        self.check(self.vm_status(qmp) == "running", "web01 does not run after the release")

    def backups(self, web: Path) -> None:
        """A full backup of the running web01, a guest write, an incremental with only that write, and a
        point-in-time restore of the full one: the restored image reads as web01 did at the first backup."""
        qmp, index_file = self.run_dir / "web01.qmp", self.backup_dir / "web01" / "index.json"
        self.playbook("backup_nightly.yml")
        full = json.loads(index_file.read_text())["backups"]
        self.check([b["mode"] for b in full] == ["full"], f"the first nightly backup is not one full backup: {full}")
        self.hmp_write(qmp, "virtio0", 0x99, 3)  # 1 MiB written by the guest after the full backup
        self.playbook("backup_nightly.yml")
        backups = json.loads(index_file.read_text())["backups"]
        self.check([b["mode"] for b in backups] == ["full", "incremental"], f"no incremental after it: {backups}")
        incremental = backups[1]
        self.check(incremental["changed_bytes"] <= 1 << 21, f"the incremental holds more than the write: {incremental}")
        self.playbook("backup_restore.yml", "-e", f"backup_id={full[0]['id']}")
        restored = self.disk("web01-restored.qcow2")
        for pattern, offset in ((0x44, 0), (0x66, 1), (0x88, 2), (0, 3)):  # as at the full backup: no 0x99 yet
            self.qemu_io(restored, f"read -P {pattern:#x} {offset}M 1M")
        restored.unlink()

    def auto_snapshot(self, web: Path, db_system: Path, db_data: Path) -> None:
        """The schedule installed for both labels (systemd units written to a scratch folder; PID 1 here is not
        systemd), then the nightly unit's own command run by hand: a snapshot of each running guest and a backup of
        each disk; then its status check."""
        etc, units = self.work / "etc-vmsnap", self.work / "systemd"
        units.mkdir()  # as /etc/systemd/system on a systemd host; the role creates only its own settings folder
        self.playbook(
            "auto_snapshot.yml", "-e", f"vmsnap_auto_config_dir={etc}", "-e", f"vmsnap_auto_systemd_dir={units}",
            "-e", "vmsnap_auto_scheduler=systemd", "-e", "vmsnap_auto_manage_service=false",
            "-e", f"vmsnap_auto_ansible_playbook={ANSIBLE_PLAYBOOK}",
            "-e", f"vmsnap_auto_collections_path={COLLECTIONS}",
        )  # fmt: skip
        for label, calendar in (("hourly", "hourly"), ("daily", "*-*-* 02:00:00")):
            timer = (units / f"vmsnap-auto-snapshot-{label}.timer").read_text()
            self.check(f"OnCalendar={calendar}\n" in timer, f"the {label} timer:\n{timer}")
            self.check((etc / f"auto_snapshot-{label}.yml").stat().st_mode & 0o777 == 0o600, f"{label} settings mode")
        service = (units / "vmsnap-auto-snapshot-daily.service").read_text()
        exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))
        argv = shlex.split(exec_start.removeprefix("ExecStart="))
        env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_NOCOLOR="1", ANSIBLE_PIPELINING="1")
        self.current = "auto_snapshot.yml (the daily unit's ExecStart)"
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
        self.check(proc.returncode == 0, f"{argv}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}")
        for disk in (web, db_system, db_data):
            taken = [n for n in self.snapshots(disk, shared=True) if n.startswith("auto-daily-")]
            self.check(len(taken) == 1, f"{disk.name} should have one auto-daily snapshot: {taken}\n{proc.stdout}")
        for vm, sets in (("web01", ["web01"]), ("db01", ["db01-system", "db01-data"])):
            for name in sets:
                index = json.loads((self.backup_dir / "scheduled" / vm / name / "index.json").read_text())
                self.check([b["mode"] for b in index["backups"]] == ["full"], f"{vm}/{name}: {index['backups']}")
        status = subprocess.run(argv + ["-e", "vmsnap_auto_mode=status"], capture_output=True, text=True, env=env,
                                timeout=300, check=False)  # fmt: skip
        self.check(status.returncode == 0, f"status after a run: rc {status.returncode}\n{status.stdout}")

    def final_offline(self, web: Path, db_system: Path, db_data: Path) -> None:
        self.current = "(all VMs stopped)"
        for pattern, offset in ((0x44, 0), (0x66, 1), (0x88, 2)):  # live rollback, RAM rollback, release
            self.qemu_io(web, f"read -P {pattern:#x} {offset}M 1M")
        for image in (web, db_system, db_data):
            self.check("backing-filename" not in self.info(image), f"{image.name} still has a backing file")
            proc = subprocess.run(["qemu-img", "check", "-q", str(image)], capture_output=True, text=True, check=False)
            self.check(proc.returncode == 0, f"qemu-img check {image.name}: {proc.stdout}{proc.stderr}")
        self.qemu_io(db_data, "read -P 0x33 1M 1M")


def uncovered() -> tuple[list[str], list[str]]:
    present = sorted(p.name for p in EXAMPLES.glob("*.yml") if p.name != "inventory.yml")
    return [n for n in present if n not in COVERED], [n for n in COVERED if n not in present]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (the VMs are stopped anyway)")
    options = parser.parse_args()
    not_run, missing = uncovered()
    if not_run or missing:
        print(f"examples/ and {Path(__file__).name} disagree: not run {not_run}, missing {missing}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="vmsnap-examples-"))
    runner = Runner(work)
    started = time.monotonic()
    print(f"make examples: {len(COVERED)} playbooks of examples/ against real VMs in {work}", flush=True)
    try:
        runner.naming_failures(runner.run)
    except ExampleFailed as exc:
        print(f"FAILED example examples/{exc.example}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        runner.stop_vms()
        if not options.keep:
            shutil.rmtree(work, ignore_errors=True)
    left = sorted(set(COVERED) - set(runner.ran))
    if left:
        print(f"FAILED: the scenario did not run {left}", file=sys.stderr)
        return 1
    passed = len(set(runner.ran))
    print(f"make examples: {passed} of {len(COVERED)} examples passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
