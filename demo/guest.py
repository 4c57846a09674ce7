# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Demo helper: a real running Linux VM for demo/live_rollback.yml, and commands inside it.

  guest.py start DIR   build the tiny guest of tests/vm (cached), start it daemonized with a qcow2 data disk,
                       wait for its guest agent; prints {"qmp": ..., "qga": ..., "disk": ..., "pid": ...} as JSON
  guest.py incoming DIR  start the same VM (same command line, same disk) with -incoming defer: it waits for a
                       state to be restored into it (vmsnap.qemu.qmp_vm_state); prints the same JSON
  guest.py exec QGA CMD  run CMD with /bin/sh inside the guest (guest-exec); prints its output, exits with its status
  guest.py stop DIR    kill the VM started in DIR (by its pidfile)

The guest agent is spoken with the collection's own client (plugins/module_utils/_guest_agent.py), imported from
$ANSIBLE_COLLECTIONS_PATH (make demo points it at build/src).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "vm"))
sys.path.insert(0, os.environ.get("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src")).split(":")[0])

from tiny_guest import GuestVM, build_tiny_guest, default_cache_dir, make_ext4_qcow2, run_in_guest  # noqa: E402

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError  # noqa: E402

BOOT_SECONDS = 90.0


def start(folder: Path, incoming: bool = False) -> dict[str, object]:
    folder.mkdir(parents=True, exist_ok=True)
    image = build_tiny_guest(default_cache_dir())
    disk = folder / "app-data.qcow2"
    if not incoming:
        make_ext4_qcow2(disk, size_mib=64)
    # The tests' own command line for this guest, minus the serial shell (nobody listens), daemonized.
    guest = GuestVM(image, [disk], folder, memory_mib=256, extra_args=["-incoming", "defer"] if incoming else [])
    qmp, qga, pidfile = guest.qmp_socket, guest.qga_socket, folder / "vm.pid"
    argv = [*guest.argv(serial_shell=False), "-daemonize", "-pidfile", str(pidfile)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)  # -daemonize returns once the sockets exist
    if incoming:
        return {"qmp": str(qmp), "qga": str(qga), "disk": str(disk), "pid": int(pidfile.read_text())}
    deadline = time.monotonic() + BOOT_SECONDS
    while True:  # the agent answers once the guest has booted; its init mounts the disk before starting it
        try:
            code, dummy = run_in_guest(str(qga), "grep -q ' /mnt/data ' /proc/mounts", connect_timeout=2)
        except VmsnapError:
            code = None
        if code == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the demo VM did not come up within {BOOT_SECONDS:g} s; see {guest.console_log}")
        time.sleep(0.5)
    return {"qmp": str(qmp), "qga": str(qga), "disk": str(disk), "pid": int(pidfile.read_text())}


def stop(folder: Path) -> None:
    """SIGTERM the VM started in folder and wait until it is gone (its disks are then closed)."""
    pidfile = folder / "vm.pid"
    if pidfile.exists():
        pid = int(pidfile.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for dummy in range(300):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()


def main() -> int:
    action = sys.argv[1]
    if action == "start":
        print(json.dumps(start(Path(sys.argv[2]).resolve())))
        return 0
    if action == "incoming":
        print(json.dumps(start(Path(sys.argv[2]).resolve(), incoming=True)))
        return 0
    if action == "exec":
        code, output = run_in_guest(sys.argv[2], sys.argv[3])
        sys.stdout.write(output)
        return code
    if action == "stop":
        stop(Path(sys.argv[2]).resolve())
        return 0
    raise SystemExit(__doc__)


if __name__ == "__main__":
    sys.exit(main())
