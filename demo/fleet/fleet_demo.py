# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""make demo: vmsnap.qemu.pre_upgrade over a fleet of three real Linux guests, through their guest agents.

Boots three tiny guests of tests/vm (Debian kernel, busybox, qemu-guest-agent; no SSH, no network, no Python),
daemonized, each with a qcow2 data disk, and installs release 1.0 of an "application" in each: its files on disk
(/mnt/data/app) and its sessions in RAM (/run/app, a tmpfs). Then runs

    ansible-playbook -i INVENTORY vmsnap.qemu.pre_upgrade -e vmsnap_serial=3 -e vmsnap_max_fail_percentage=100 ...

with every guest reached through the vmsnap.qemu.qga connection and vmsnap_vm_start set to its QEMU command line,
so that the roles take external checkpoints with RAM and can restart QEMU. The upgrade (demo/fleet/upgrade.yml)
succeeds on web1, breaks the application on web2 (its health check, demo/fleet/health.yml, fails) and takes web3's
guest agent down (web3 becomes unreachable). Prints the playbook's summary and, read inside each guest through its
agent, the proof that the rolled-back guests have their checkpoint's files on disk and in RAM again, were not
rebooted, and that web3 answers again. Stops every VM it started, whatever happened.

    fleet_demo.py [FOLDER]    (default $DEMO_FLEET_DIR or /tmp/vmsnap-fleet-demo; emptied first)

Exits 0 when everything happened as described, 1 otherwise. The collection is taken from $ANSIBLE_COLLECTIONS_PATH
(make demo points it at build/src).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import typing as t
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
COLLECTIONS = os.environ.get("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src")).split(":")[0]
sys.path.insert(0, str(REPO / "tests" / "vm"))
sys.path.insert(0, COLLECTIONS)

import yaml  # noqa: E402
from tiny_guest import GuestImage, GuestVM, build_tiny_guest, default_cache_dir, make_ext4_qcow2, run_in_guest  # noqa: E402

from ansible_collections.vmsnap.qemu.plugins.filter.report import report_lines  # noqa: E402
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError  # noqa: E402

# How the upgrade ends for each guest (demo/fleet/upgrade.yml), and what pre_upgrade must then do with it.
PLAN = {"web1": "good", "web2": "breaks-app", "web3": "unreachable"}
EXPECTED_OUTCOME = {"good": "upgraded", "breaks-app": "rolled back", "unreachable": "rolled back"}
PLAN_WORDS = {
    "good": "the upgrade succeeds",
    "breaks-app": "the upgrade breaks the application (its health check fails)",
    "unreachable": "the upgrade takes the guest agent down (the guest becomes unreachable)",
}
MEMORY_MIB = 128
BOOT_SECONDS = 90.0

INSTALL_1_0 = (
    "mkdir -p /mnt/data/app /run/app && echo 1.0 > /mnt/data/app/VERSION && echo healthy > /mnt/data/app/STATE"
    " && echo sessions=42 > /run/app/sessions && sync"
)
# Dropping the page cache first makes the guest read its files from the disk, not from RAM.
LOOK = (
    "sync; echo 3 > /proc/sys/vm/drop_caches;"
    " for f in /mnt/data/app/VERSION /mnt/data/app/STATE /run/app/sessions /proc/sys/kernel/random/boot_id"
    " /run/qemu-ga.pid; do echo \"$(cat $f 2>/dev/null || echo '(missing)')\"; done"
)
LOOK_FIELDS = ("version", "state", "sessions", "boot_id", "agent_pid")


class Guest:
    """One tiny guest, started daemonized with the command line that vmsnap_vm_start repeats."""

    def __init__(self, folder: Path, name: str, image: GuestImage) -> None:
        self.name = name
        self.folder = folder / name
        self.folder.mkdir(parents=True)
        self.disk = make_ext4_qcow2(self.folder / "app-data.qcow2", size_mib=64)
        vm = GuestVM(image, [self.disk], self.folder, memory_mib=MEMORY_MIB)
        self.qmp, self.qga, self.pidfile = vm.qmp_socket, vm.qga_socket, self.folder / "qemu.pid"
        self.argv = [*vm.argv(serial_shell=False), "-daemonize", "-pidfile", str(self.pidfile)]
        self.console_log = vm.console_log

    def start(self) -> None:
        subprocess.run(self.argv, check=True, stdout=subprocess.DEVNULL)  # returns once the sockets exist

    def run(self, command: str, connect_timeout: float = 5.0) -> tuple[int, str]:
        """command with /bin/sh in the guest, through its agent (guest-exec): (exit status, stdout + stderr)."""
        try:
            return run_in_guest(self.qga, command, connect_timeout, timeout=30)
        except RuntimeError as exc:
            raise RuntimeError(f"{self.name}: {exc}") from None

    def look(self) -> dict[str, str]:
        code, out = self.run(LOOK)
        if code != 0:
            raise RuntimeError(f"{self.name}: reading the application's files failed ({code}): {out}")
        return dict(zip(LOOK_FIELDS, out.splitlines()))

    def inventory_vars(self, plan: str) -> dict[str, t.Any]:
        return {
            "demo_upgrade": plan,
            "vmsnap_qmp_socket": str(self.qmp),
            "vmsnap_qga_socket": str(self.qga),
            "vmsnap_vm_start": self.argv,
        }


def say(text: str = "") -> None:
    print(text, flush=True)


def wait_until_up(guests: list[Guest]) -> None:
    """Every guest's agent answers once it has booted (its init mounts the data disk before it starts the agent)."""
    deadline = time.monotonic() + BOOT_SECONDS

    def wait(guest: Guest) -> None:
        while True:
            with contextlib.suppress(VmsnapError):
                if guest.run("grep -q ' /mnt/data ' /proc/mounts", connect_timeout=1)[0] == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{guest.name} was not up within {BOOT_SECONDS:g} s; see {guest.console_log}")
            time.sleep(0.3)

    with concurrent.futures.ThreadPoolExecutor(len(guests)) as pool:
        for future in [pool.submit(wait, guest) for guest in guests]:
            future.result()


def write_inventory(folder: Path, guests: list[Guest]) -> Path:
    inventory = {
        "all": {
            "children": {
                "fleet": {
                    "hosts": {g.name: g.inventory_vars(PLAN[g.name]) for g in guests},
                    "vars": {
                        "ansible_connection": "vmsnap.qemu.qga",
                        "vmsnap_qga_connect_timeout": 3,
                        "vmsnap_hypervisor": "localhost",
                        "vmsnap_manifest_dir": str(folder / "manifests"),
                    },
                }
            }
        }
    }
    path = folder / "inventory.yml"
    path.write_text(yaml.safe_dump(inventory, sort_keys=False, width=1000))
    return path


def run_pre_upgrade(folder: Path, inventory: Path) -> tuple[int, Path]:
    report = folder / "report.json"
    argv = [
        str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), "vmsnap.qemu.pre_upgrade",
        "-e", "vmsnap_targets=fleet", "-e", "vmsnap_serial=3", "-e", "vmsnap_max_fail_percentage=100",
        "-e", f"vmsnap_upgrade_tasks={HERE / 'upgrade.yml'}", "-e", f"vmsnap_health_tasks={HERE / 'health.yml'}",
        "-e", f"vmsnap_report={report}",
    ]  # fmt: skip
    say("$ ansible-playbook " + " ".join(a.replace(f"{REPO}/", "") for a in argv[1:]))
    env = dict(
        os.environ,
        ANSIBLE_COLLECTIONS_PATH=COLLECTIONS,
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_PIPELINING="1",
        LANG="C.UTF-8",
    )
    started = time.monotonic()
    with open(folder / "pre_upgrade.log", "w") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=folder, text=True)
        assert proc.stdout is not None
        progress = Progress(started)
        try:
            for line in proc.stdout:
                log.write(line)
                progress.feed(line)
            progress.flush()
        finally:  # interrupted: the playbook must not go on against VMs that are about to be stopped
            if proc.poll() is None:
                proc.terminate()
            proc.wait()
    return proc.returncode, report


class Progress:
    """One line per task of the playbook that changed something or failed somewhere (the whole output goes to the
    log): its time, its name, and which guests did what."""

    BANNER = re.compile(r"^TASK \[(?:vmsnap\.qemu\.)?(.*?)\] \*+$")
    RESULT = re.compile(r"^(changed|fatal|failed): \[([^\]\s]+)[^\]]*\](: (\w+)!)?")

    def __init__(self, started: float) -> None:
        self.started = started
        self.task = ""
        self.results: dict[str, list[str]] = {}

    def feed(self, line: str) -> None:
        banner = self.BANNER.match(line)
        if banner or line.startswith(("PLAY ", "PLAY RECAP")):
            self.flush()
            self.task = banner.group(1).replace(" : ", ": ", 1) if banner else ""
            return
        result = self.RESULT.match(line)
        if result and self.task:
            word = "changed" if result.group(1) == "changed" else (result.group(4) or "FAILED")
            self.results.setdefault(word, []).append(result.group(2))

    def flush(self) -> None:
        if self.results:
            name = self.task if len(self.task) <= 78 else self.task[:75] + "..."
            hosts = "; ".join(f"{word} {' '.join(sorted(hosts))}" for word, hosts in self.results.items())
            say(f"  {time.monotonic() - self.started:5.1f} s  {name:78}  {hosts}")
        self.results = {}


def own_qemu_pids(folder: Path) -> list[int]:
    """QEMU processes whose command line names this demo's folder: the ones it started, and the roles restarted."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                argv = proc.joinpath("cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"qemu-system-x86_64") and any(os.fsencode(folder) + b"/" in a for a in argv):
                    pids.append(int(proc.name))
    return pids


def stop_all(folder: Path) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = own_qemu_pids(folder)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.05)
        if not pids:
            return


def show(state: dict[str, str]) -> str:
    return (
        f"disk: VERSION={state['version']} STATE={state['state']:8} RAM: {state['sessions']:12}"
        f" boot {state['boot_id'][:8]}  qemu-ga pid {state['agent_pid']}"
    )


def prove(guests: list[Guest], before: dict[str, dict[str, str]], report: dict[str, t.Any]) -> bool:
    """Read each guest's files inside it (through its agent) and compare with what its outcome promises."""
    good = True
    for guest in guests:
        outcome = report["guests"].get(guest.name, {}).get("outcome", "?")
        try:
            now = guest.look()
        except (VmsnapError, RuntimeError) as exc:
            say(f"  {guest.name:5} {outcome:12} its guest agent does not answer: {exc}")
            good = False
            continue
        if outcome == "rolled back":
            expected = before[guest.name]
            verdict = "= the checkpoint's files, on disk and in RAM; same boot and agent process: not rebooted"
            if PLAN[guest.name] == "unreachable":
                verdict += "; its agent, killed by the upgrade, answers again"
        else:
            expected = {**before[guest.name], "version": "2.0", "sessions": "sessions=0"}
            verdict = "= release 2.0, healthy: the upgrade is kept"
        wrong = [
            f"{key} {now.get(key)!r} (expected {value!r})" for key, value in expected.items() if now.get(key) != value
        ]
        good = good and not wrong
        say(f"  {guest.name:5} {outcome:12} {show(now)}")
        say(f"  {'':18} {verdict if not wrong else 'NOT as expected: ' + ', '.join(wrong)}")
    return good


def boot_fleet(folder: Path) -> tuple[list[Guest], dict[str, dict[str, str]]]:
    """Three guests up, each with release 1.0 of the application installed; what each looks like then."""
    say(
        f"Booting 3 tiny Linux guests ({MEMORY_MIB} MiB each; Debian kernel, busybox, qemu-guest-agent;"
        " no SSH, no network, no Python) ..."
    )
    image = build_tiny_guest(default_cache_dir())
    guests = [Guest(folder, name, image) for name in PLAN]
    for guest in guests:
        guest.start()
    wait_until_up(guests)
    before = {}
    for guest in guests:
        code, out = guest.run(INSTALL_1_0)
        if code != 0:
            raise RuntimeError(f"{guest.name}: installing release 1.0 failed ({code}): {out}")
        before[guest.name] = guest.look()
    return guests, before


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DEMO_FLEET_DIR") or "/tmp/vmsnap-fleet-demo")
    folder = folder.resolve()
    signal.signal(signal.SIGTERM, lambda *dummy: sys.exit(143))
    started = time.monotonic()
    stop_all(folder)  # what an interrupted earlier run left
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "manifests").mkdir(parents=True)
    say("== vmsnap.qemu.pre_upgrade over a fleet of three real guests, reached only through their guest agents ==")
    try:
        guests, before = boot_fleet(folder)
        say(
            f"Up after {time.monotonic() - started:.0f} s. Each runs release 1.0 of an application: VERSION=1.0 and"
            " STATE=healthy on its disk (/mnt/data/app), sessions=42 in RAM (/run/app, a tmpfs). The upgrade to 2.0:"
        )
        for guest in guests:
            say(f"  {guest.name}: {PLAN_WORDS[PLAN[guest.name]]}")
        say()
        rc, report_file = run_pre_upgrade(folder, write_inventory(folder, guests))
        report = json.loads(report_file.read_text()) if report_file.exists() else {"guests": {}}
        say(f"ansible-playbook exited with {rc}{' (some guests failed)' if rc == 2 else ''}.")
        say()
        say("Summary (vmsnap.qemu.pre_upgrade):")
        for line in report_lines(report) if report["guests"] else ["(no report was written)"]:
            say(f"  {line}")
        say()
        say("Inside each guest now, read through its guest agent (page cache dropped first: the files come from disk):")
        proven = prove(guests, before, report)
        wrong = [
            f"{g.name} {report['guests'].get(g.name, {}).get('outcome', 'not reported')}"
            for g in guests
            if report["guests"].get(g.name, {}).get("outcome") != EXPECTED_OUTCOME[PLAN[g.name]]
        ]
        say()
        if proven and not wrong:
            say("As planned: web1 keeps its upgrade; web2 and web3 run again from their checkpoints.")
            return 0
        say(f"NOT as planned{': ' + ', '.join(wrong) if wrong else ''}. See the files in {folder}.")
        return 1
    finally:
        stop_all(folder)
        say(
            f"Stopped every VM of the demo; {time.monotonic() - started:.0f} s in all. The playbook's whole output,"
            f" the inventory, the report and the manifests are in {folder}."
        )


if __name__ == "__main__":
    sys.exit(main())
