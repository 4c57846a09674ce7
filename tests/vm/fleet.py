# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Fleets of real VMs for the workflow tests (roles and playbooks): VMs without a guest OS, started the way an
operator's vmsnap_vm_start would (a daemonizing QEMU command line), with data checked through qemu-io; and
inventories that describe them, run with ansible-playbook against the collection copy."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import typing as t
from pathlib import Path

import yaml
from ansible_server import run_ansible

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
PATTERN_SIZE = "1M"


def qmp_execute(sock_path: Path | str, command: str, arguments: dict[str, t.Any] | None = None) -> t.Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(os.fspath(sock_path))
        reader = sock.makefile("rb")
        json.loads(reader.readline())  # greeting
        reply: dict[str, t.Any] = {}
        for request in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments or {}}):
            sock.sendall(json.dumps(request).encode() + b"\n")
            while True:
                reply = json.loads(reader.readline())
                if "event" not in reply:
                    break
        if "error" in reply:
            raise RuntimeError(f"QMP {command} failed: {reply['error']}")
        return reply["return"]


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


class NoOsVM:
    """A running QEMU with qcow2 disks (drive0, drive1, ...) and no guest OS: the firmware idles, the block layer is
    real, and qemu-io through HMP writes and checks what a guest would see."""

    def __init__(self, folder: Path, name: str, disks: int = 1, memory_mib: int = 64) -> None:
        self.name = name
        self.folder = (folder / name).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.qmp = self.folder / "qmp.sock"
        self.pidfile = self.folder / "qemu.pid"
        self.disks = [self.folder / f"disk{i}.qcow2" for i in range(disks)]
        self.memory_mib = memory_mib

    def create_disks(self, pattern: int = 0xAA, size: str = "16M") -> NoOsVM:
        for disk in self.disks:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, size], check=True)
            subprocess.run(
                ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} 0 {PATTERN_SIZE}", disk],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        return self

    def argv(self) -> list[str]:
        """The command line an operator would put in vmsnap_vm_start: QEMU daemonizes once its sockets exist."""
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", str(self.memory_mib), "-nodefaults",
            "-no-user-config", "-display", "none", "-qmp", f"unix:{self.qmp},server=on,wait=off",
            "-daemonize", "-pidfile", str(self.pidfile),
        ]  # fmt: skip
        for i, disk in enumerate(self.disks):
            argv += [
                "-drive",
                f"file={disk},if=none,id=drive{i},format=qcow2",
                "-device",
                f"virtio-blk-pci,drive=drive{i}",
            ]
        return argv

    def start(self, extra: t.Sequence[str] = ()) -> NoOsVM:
        subprocess.run([*self.argv(), *extra], check=True, stdout=subprocess.DEVNULL)
        return self

    @property
    def pid(self) -> int:
        return int(self.pidfile.read_text())

    def running(self) -> bool:
        try:
            return _pid_alive(self.pid) and qmp_execute(self.qmp, "query-status")["status"] is not None
        except (OSError, ValueError, RuntimeError):
            return False

    def status(self) -> str:
        return str(qmp_execute(self.qmp, "query-status")["status"])

    def kill(self) -> None:
        """SIGKILL, as a crash: the socket file stays behind."""
        try:
            pid = self.pid
        except (OSError, ValueError):
            return
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def qemu_io(self, drive: str, command: str) -> str:
        out = qmp_execute(self.qmp, "human-monitor-command", {"command-line": f'qemu-io {drive} "{command}"'})
        return str(out)

    def write(self, pattern: int, drive: str = "drive0") -> None:
        out = self.qemu_io(drive, f"write -P {pattern:#x} 0 {PATTERN_SIZE}")
        assert "error" not in out.lower() and "failed" not in out.lower(), out

    def active_file(self, drive: str = "drive0") -> Path:
        for entry in qmp_execute(self.qmp, "query-block"):
            if entry.get("device") == drive:
                return Path(entry["inserted"]["file"])
        raise AssertionError(f"{self.name} has no drive {drive}")

    def reads(self, pattern: int, drive: str = "drive0") -> bool:
        """What the running guest sees at offset 0: QEMU flushes its caches, then the active layer's chain is read.
        (HMP qemu-io prints a read's verdict on QEMU's stdout, not to the monitor, so the read happens outside.)"""
        self.qemu_io(drive, "flush")
        return offline_reads(self.active_file(drive), pattern)


def offline_reads(image: Path, pattern: int) -> bool:
    """What the image chain holds at offset 0, read without a VM (-U: shared, no lock needed)."""
    proc = subprocess.run(
        ["qemu-io", "-U", "-r", "-c", f"read -P {pattern:#x} 0 {PATTERN_SIZE}", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0 and "verification failed" not in proc.stdout.lower()


def snapshot_names(image: Path) -> list[str]:
    out = subprocess.run(
        ["qemu-img", "snapshot", "-U", "-l", str(image)], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[1] for line in out.splitlines()[2:] if line.strip()]


def backing_file(image: Path) -> str | None:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(image)], capture_output=True, text=True, check=True
        ).stdout
    )
    return info.get("backing-filename")


def guest_vars(vm: NoOsVM, *, hypervisor: str = "localhost", start: bool = True, **extra: t.Any) -> dict[str, t.Any]:
    """Inventory variables of a guest host whose VM is vm (its 'guest' is reached with a local connection)."""
    values: dict[str, t.Any] = {
        "ansible_connection": "local",
        "ansible_python_interpreter": str(VENV_BIN / "python"),
        "vmsnap_vm_name": vm.name,
        "vmsnap_qmp_socket": str(vm.qmp),
        "vmsnap_hypervisor": hypervisor,
        "fleet_qmp": str(vm.qmp),
    }
    if start:
        values["vmsnap_vm_start"] = vm.argv()
    values.update(extra)
    return values


def write_inventory(
    path: Path, guests: dict[str, dict[str, t.Any]], hypervisors: dict[str, dict[str, t.Any]] | None = None
) -> Path:
    """hypervisors: inventory host -> extra variables (they get a local connection)."""
    hosts = {
        name: {"ansible_connection": "local", "ansible_python_interpreter": str(VENV_BIN / "python"), **extra}
        for name, extra in (hypervisors or {}).items()
    }
    inventory = {"all": {"children": {"hypervisors": {"hosts": hosts}, "guests": {"hosts": guests}}}}
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


def run_playbook(
    playbook: str, inventory: Path, *extra_args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    environ = dict(
        os.environ,
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_NOCOLOR="1",
        LANG="C.UTF-8",
    )
    environ.setdefault("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src"))
    environ.setdefault("ANSIBLE_PIPELINING", "1")  # one process per task instead of a temp file and three commands
    environ.update(env or {})
    argv = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), playbook, *extra_args]
    return run_ansible(argv, environ, timeout)  # ansible-playbook without its start-up cost each time


def recap(stdout: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host."""
    result: dict[str, dict[str, int]] = {}
    in_recap = False
    for line in stdout.splitlines():
        if line.startswith("PLAY RECAP"):
            in_recap = True
            continue
        if in_recap and ":" in line and "=" in line:
            host, counters = line.split(":", 1)
            result[host.strip()] = {k: int(v) for k, v in (item.split("=") for item in counters.split())}
    return result


def manifest(folder: Path, vm: str, name: str = "pre-upgrade") -> dict[str, t.Any] | None:
    path = folder / vm / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


# The workflow tests' conventions: data OLD at the checkpoint, NEW written after it; upgrade and health tasks of
# tests/vm/workflow for VMs without a guest OS.
OLD, NEW = 0xAA, 0xCC
WORKFLOW = Path(__file__).resolve().parent / "workflow"


def start_fleet(folder: Path, count: int) -> list[NoOsVM]:
    """count running VMs vm0, vm1, ... in folder, each disk holding OLD at offset 0."""
    vms = [NoOsVM(folder, f"vm{i}").create_disks(OLD) for i in range(count)]
    for vm in vms:
        vm.start()
    return vms


def common_vars(folder: Path, manifests: bool = True) -> list[str]:
    return [
        *(["-e", f"vmsnap_manifest_dir={folder / 'manifests'}"] if manifests else []),
        "-e", f"vmsnap_upgrade_tasks={WORKFLOW / 'upgrade.yml'}",
        "-e", f"vmsnap_health_tasks={WORKFLOW / 'health.yml'}",
        "-e", f"fleet_helper={Path(__file__).resolve()}",
        "-e", f"vmsnap_report={folder / 'report.json'}",
    ]  # fmt: skip


def assert_nothing_left(vm: NoOsVM) -> None:
    """No snapshot, overlay or state file of the checkpoint, and the disk is the VM's own again."""
    for disk in vm.disks:
        assert "pre-upgrade" not in snapshot_names(disk)
        assert backing_file(disk) is None
    leftovers = [p.name for p in vm.folder.iterdir() if "vmsnap-" in p.name]
    assert leftovers == [], leftovers


def changed_count(proc: subprocess.CompletedProcess[str], host: str) -> int:
    return recap(proc.stdout)[host]["changed"]


def main(argv: list[str]) -> int:
    """fleet.py qemu-io SOCKET DRIVE COMMAND: a guest-visible write through the running VM (for upgrade tasks)."""
    if len(argv) != 4 or argv[0] != "qemu-io":
        raise SystemExit(main.__doc__)
    out = str(qmp_execute(argv[1], "human-monitor-command", {"command-line": f'qemu-io {argv[2]} "{argv[3]}"'}))
    print(out)
    return 1 if ("error" in out.lower() or "failed" in out.lower()) else 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
