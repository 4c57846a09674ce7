# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Helper of the molecule scenarios: the VMs without a guest OS of tests/vm/fleet.py (DIR/NAME/disk0.qcow2,
disk1.qcow2, qmp.sock, qemu.pid; drives drive0, drive1), one call per VM and step so that each playbook stays short.

  vms.py create DIR NAME PATTERN -- ARGV...   two disks holding PATTERN, then QEMU started with ARGV (the
                                              inventory's command line; it daemonizes once its QMP socket exists)
  vms.py write DIR NAME PATTERN               what an upgrade writes: PATTERN on every disk, through the running VM
                                              (HMP qemu-io); then checked as with reads
  vms.py reads DIR NAME PATTERN               every disk reads PATTERN at offset 0 (QEMU flushes first, then the
                                              active layers are read offline), and the VM runs
  vms.py nothing-left DIR NAME CHECKPOINT     no internal snapshot CHECKPOINT, no overlay, no state file, and the
                                              VM runs on its own disks again
  vms.py destroy DIR                          stop every QEMU that has a pidfile under DIR (only when its command
                                              line names that pidfile), then delete DIR

Each prints one JSON line and exits 1 when the check fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests" / "vm"))

from fleet import NoOsVM, _pid_alive, backing_file, qmp_execute, snapshot_names  # noqa: E402

DISKS = 2


def _vm(folder: str, name: str) -> NoOsVM:
    return NoOsVM(Path(folder), name, disks=DISKS)


def _drives(vm: NoOsVM) -> list[str]:
    return [f"drive{i}" for i in range(len(vm.disks))]


def create(folder: str, name: str, pattern: int, argv: list[str]) -> dict[str, t.Any]:
    vm = _vm(folder, name).create_disks(pattern)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return {"ok": vm.running(), "disks": [str(d) for d in vm.disks]}


def reads(folder: str, name: str, pattern: int) -> dict[str, t.Any]:
    vm = _vm(folder, name)
    found = {drive: vm.reads(pattern, drive) for drive in _drives(vm)}
    status = vm.status()
    ok = all(found.values()) and status == "running"
    return {"ok": ok, "reads": found, "pattern": hex(pattern), "status": status}


def write(folder: str, name: str, pattern: int) -> dict[str, t.Any]:
    vm = _vm(folder, name)
    for drive in _drives(vm):
        vm.write(pattern, drive)
    return reads(folder, name, pattern)


def nothing_left(folder: str, name: str, checkpoint: str) -> dict[str, t.Any]:
    vm = _vm(folder, name)
    problems = []
    for disk in vm.disks:
        if checkpoint in snapshot_names(disk):
            problems.append(f"{disk} still has snapshot {checkpoint}")
        if backing_file(disk) is not None:
            problems.append(f"{disk} has a backing file")
    problems += [f"left behind: {p}" for p in sorted(vm.folder.iterdir()) if "vmsnap-" in p.name]
    if not vm.running():
        problems.append("the VM does not run")
    else:
        for entry in qmp_execute(vm.qmp, "query-block"):
            active = entry.get("inserted", {}).get("file")
            if active and Path(active) not in vm.disks:
                problems.append(f"{entry['device']} runs on {active}, not on its own disk")
    return {"ok": not problems, "problems": problems}


def _stop(pidfile: Path) -> str:
    try:
        pid = int(pidfile.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return f"{pidfile}: no process"
    if os.fsencode(pidfile) not in cmdline:
        return f"{pidfile}: process {pid} is not this VM"
    # The VM is thrown away with its disks: no need for a clean shutdown.
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return f"{pidfile}: stopped {pid}"


def destroy(folder: str) -> dict[str, t.Any]:
    root = Path(folder)
    stopped = [_stop(pidfile) for pidfile in sorted(root.glob("*/*.pid"))] if root.is_dir() else []
    shutil.rmtree(root, ignore_errors=True)
    return {"ok": not root.exists(), "stopped": stopped}


def main(argv: list[str]) -> int:
    args, qemu_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    if args[:1] == ["create"] and len(args) == 4 and qemu_argv:
        result = create(args[1], args[2], int(args[3], 16), qemu_argv)
    elif args[:1] == ["write"] and len(args) == 4:
        result = write(args[1], args[2], int(args[3], 16))
    elif args[:1] == ["reads"] and len(args) == 4:
        result = reads(args[1], args[2], int(args[3], 16))
    elif args[:1] == ["nothing-left"] and len(args) == 4:
        result = nothing_left(args[1], args[2], args[3])
    elif args[:1] == ["destroy"] and len(args) == 2:
        result = destroy(args[1])
    else:
        raise SystemExit(__doc__)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
