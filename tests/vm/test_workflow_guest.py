# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The pre_upgrade playbook on the tiny real Linux guest, reached only through the vmsnap.qemu.qga connection: an
upgrade that makes the guest unreachable is rolled back on the hypervisor (an internal checkpoint with RAM, loaded
live), and the guest answers again with its files on disk and in RAM as at the checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest
from fleet import REPO, VENV_BIN, manifest, recap, run_playbook, write_inventory
from tiny_guest import GuestImage, GuestVM, make_ext4_qcow2, run_in_guest

sys.path.insert(0, os.environ.get("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src")).split(os.pathsep)[0])
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError  # noqa: E402

HERE = Path(__file__).resolve().parent
BOOT_SECONDS = 120.0


def in_guest(qga: Path, command: str, connect_timeout: float = 3.0) -> tuple[int, str]:
    return run_in_guest(qga, command, connect_timeout)


def wait_for_guest(qga: Path) -> None:
    deadline = time.monotonic() + BOOT_SECONDS
    while time.monotonic() < deadline:
        with contextlib.suppress(VmsnapError, OSError):
            if in_guest(qga, "grep -q ' /mnt/data ' /proc/mounts", connect_timeout=2)[0] == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"the guest's agent did not answer within {BOOT_SECONDS:g} s")


@pytest.fixture
def guest(guest_image: GuestImage, tmp_path: Path) -> t.Iterator[dict[str, t.Any]]:
    """A tiny guest started daemonized from its own command line, which is also its vmsnap_vm_start."""
    disk = make_ext4_qcow2(tmp_path / "app-data.qcow2", size_mib=64)
    vm = GuestVM(guest_image, [disk], tmp_path / "vm", memory_mib=128)
    vm.workdir.mkdir(parents=True)
    pidfile = vm.workdir / "qemu.pid"
    argv = [*vm.argv(serial_shell=False), "-daemonize", "-pidfile", str(pidfile)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    try:
        wait_for_guest(vm.qga_socket)
        yield {"argv": argv, "qmp": vm.qmp_socket, "qga": vm.qga_socket, "pidfile": pidfile}
    finally:
        with contextlib.suppress(OSError, ValueError):  # the rollback may have restarted QEMU: its pid is in the file
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_unreachable_guest_is_rolled_back_and_answers_again(guest: dict[str, t.Any], tmp_path: Path) -> None:
    code, out = in_guest(
        guest["qga"],
        "mkdir -p /mnt/data/app /run/app && echo 1.0 > /mnt/data/app/VERSION && echo sessions=42 > /run/app/sessions"
        " && sync && cat /proc/sys/kernel/random/boot_id",
    )
    assert code == 0, out
    boot_id = out.strip()
    guest_vars = {
        "ansible_connection": "vmsnap.qemu.qga",
        "vmsnap_qga_socket": str(guest["qga"]),
        "vmsnap_qga_connect_timeout": 3,
        "vmsnap_qmp_socket": str(guest["qmp"]),
        "vmsnap_vm_start": guest["argv"],
        "vmsnap_method": "internal",  # loaded live with snapshot-load; external is the examples' and the demo's
        "ansible_python_interpreter": str(VENV_BIN / "python"),
    }
    inventory = write_inventory(tmp_path / "inventory.yml", {"app1": guest_vars})
    proc = run_playbook(
        "vmsnap.qemu.pre_upgrade", inventory, "-e", "vmsnap_targets=guests",
        "-e", f"vmsnap_manifest_dir={tmp_path / 'manifests'}", "-e", f"vmsnap_report={tmp_path / 'report.json'}",
        "-e", f"vmsnap_upgrade_tasks={HERE / 'workflow' / 'upgrade_guest.yml'}",
    )  # fmt: skip
    assert recap(proc.stdout)["app1"]["failed"] == 1, proc.stdout
    assert "Guest app1 is unreachable after its upgrade" in proc.stdout, proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())["guests"]["app1"]
    assert report["outcome"] == "rolled back" and report["rolled_back"] and report["released"], report
    assert report["method"] == "internal"
    assert manifest(tmp_path / "manifests", "app1")["state"] == "released"
    # Reachable again, with the checkpoint's files on disk (read from the disk) and in RAM, and not rebooted.
    code, out = in_guest(
        guest["qga"],
        "sync; echo 3 > /proc/sys/vm/drop_caches;"
        " cat /mnt/data/app/VERSION /run/app/sessions /proc/sys/kernel/random/boot_id",
    )
    assert code == 0 and out.split() == ["1.0", "sessions=42", boot_id], out
