# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""A QEMU that dies during an external snapshot's overlay transaction, on real files made by the real qemu-img: the
overlays it had not finished creating (an empty claimed file; a qcow2 without its backing file yet, which is what a
QEMU killed mid-create leaves, see tests/vm/test_killed_vm.py) are removed, a finished one is kept and named with
the offline fix; a lost connection to a QEMU that lives on removes nothing."""

from __future__ import annotations

import pathlib
import subprocess
import typing as t

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._live import DevicePlan
from ansible_collections.vmsnap.qemu.plugins.module_utils._live_execute import _overlay_transaction
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpConnectionError, QmpVmDiedError

DIED = "QEMU (pid 4242) behind /run/vm.sock exited while we waited for the reply to transaction: the VM died."


class LostQmp:
    """Stands in for the QMP client at the moment the transaction's reply never comes."""

    def __init__(self, error: QmpConnectionError) -> None:
        self.error = error
        self.commands: list[str] = []

    def execute(self, command: str, arguments: t.Any = None, timeout: float | None = None) -> t.Any:
        self.commands.append(command)
        raise self.error


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def overlays(tmp_path: pathlib.Path) -> tuple[list[DevicePlan], dict[str, pathlib.Path]]:
    disk = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "16M")
    files = {
        "empty": tmp_path / "a.vmsnap-x.qcow2",  # claimed; QEMU never began it
        "half": tmp_path / "b.vmsnap-x.qcow2",  # header written, size and backing file not yet
        "done": tmp_path / "c.vmsnap-x.qcow2",  # finished: QEMU may have switched the disk to it
    }
    files["empty"].write_bytes(b"")
    qemu_img("create", "-q", "-f", "qcow2", str(files["half"]), "0")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "qcow2", str(files["done"]))
    devices = [
        DevicePlan(name, {"node_name": f"node-{name}", "file": str(disk)}, has_snapshot=False, overlay=str(path))
        for name, path in files.items()
    ]
    return devices, files


def test_a_qemu_that_died_leaves_only_the_overlays_it_may_have_used(
    overlays: tuple[list[DevicePlan], dict[str, pathlib.Path]],
) -> None:
    devices, files = overlays
    qmp = LostQmp(QmpVmDiedError(DIED, vm_died=True))
    with pytest.raises(QmpVmDiedError) as caught:
        _overlay_transaction(t.cast(t.Any, qmp), devices, [str(p) for p in files.values()], 5)
    assert qmp.commands == ["transaction"]
    assert not files["empty"].exists() and not files["half"].exists() and files["done"].exists()
    msg = caught.value.msg
    assert msg.startswith(DIED)
    assert f"QEMU had not finished creating {files['empty']}, {files['half']}, so no disk" in msg
    assert f"overlay files {files['done']} and written to them" in msg and "qcow2_chain state=committed" in msg
    assert caught.value.details["removed_overlays"] == [str(files["empty"]), str(files["half"])]
    assert caught.value.details["leftover_overlays"] == [str(files["done"])]


def test_a_lost_connection_to_a_living_qemu_removes_nothing(
    overlays: tuple[list[DevicePlan], dict[str, pathlib.Path]],
) -> None:
    devices, files = overlays
    lost = "QEMU closed the connection /run/vm.sock while we waited for the reply to transaction."
    qmp = LostQmp(QmpConnectionError(lost))
    with pytest.raises(QmpConnectionError) as caught:
        _overlay_transaction(t.cast(t.Any, qmp), devices, [str(p) for p in files.values()], 5)
    assert caught.value.msg == lost and "removed_overlays" not in caught.value.details
    assert all(path.exists() for path in files.values())  # QEMU may be using any of them
