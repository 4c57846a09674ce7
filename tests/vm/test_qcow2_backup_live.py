# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""qcow2_backup on a running VM (QEMU under TCG without a guest OS, two qcow2 disks; writes through HMP qemu-io):
full -> B -> incremental -> C -> incremental of both disks at one instant, each backup restored and read back; the
incrementals survive a clean VM restart; a SIGKILLed QEMU leaves the bitmap inconsistent (full + warning, or a
failure with on_broken_chain=fail); a deleted bitmap likewise; the four runs of present; a foreign bitmap untouched.
The module's main() runs in this process."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest
from qcow2_backup_helpers import MIB, NoOsVm, bitmaps, new_image, ok, reads, run

FOREIGN = "other-tool"


@pytest.fixture
def vm(tmp_path: Path) -> t.Iterator[NoOsVm]:
    disks = [new_image(tmp_path / "db01-disk0.qcow2"), new_image(tmp_path / "db01-disk1.qcow2")]
    machine = NoOsVm(tmp_path, disks).start()
    with machine.qmp() as qmp:
        qmp.execute("block-dirty-bitmap-add", {"node": "disk1", "name": FOREIGN, "persistent": True})
    try:
        yield machine
    finally:
        machine.kill()


def backups(result: dict[str, t.Any]) -> list[tuple[str, str, str | None]]:
    return [(s["set"], s["backup"]["mode"], s["backup"]["id"]) for s in result["sets"]]


def test_two_disks_at_one_instant_each_backup_restored(vm: NoOsVm, tmp_path: Path) -> None:
    dest = tmp_path / "backups"
    dest.mkdir()
    base = dict(socket=str(vm.sock), dest_dir=str(dest))
    vm.hmp_write("drive0", 0xA0, 0)
    vm.hmp_write("drive1", 0xA1, 0)
    check = run(check=True, diff=True, **base)
    full, again, again_check = ok(diff=True, **base), ok(**base), run(check=True, **base)
    assert [r["changed"] for r in (check, full, again, again_check)] == [True, True, False, False]
    new_id = full["sets"][0]["backup"]["id"]
    assert check["diff"]["after"] == {"db01-disk0": [new_id], "db01-disk1": [new_id]}
    ids = {s["backup"]["id"] for s in full["sets"]}
    assert len(ids) == 1 and [s["backup"]["mode"] for s in full["sets"]] == ["full", "full"]
    vm.hmp_write("drive0", 0xB0, 2 * MIB)
    vm.hmp_write("drive1", 0xB1, 2 * MIB)
    inc1 = ok(**base)
    vm.hmp_write("drive0", 0xC0, 4 * MIB)
    inc2 = ok(devices=["drive0"], **base)  # only one disk
    assert [s["set"] for s in inc2["sets"]] == ["db01-disk0"] and inc2["backup"]["mode"] == "incremental"
    assert [(s["backup"]["mode"], s["backup"]["changed_bytes"]) for s in inc1["sets"]] == [
        ("incremental", MIB),
        ("incremental", MIB),
    ]
    assert inc1["sets"][0]["backup"]["size"] < MIB + 512 * 1024 and inc2["backup"]["changed_bytes"] == MIB
    assert FOREIGN in {b["name"] for b in _bitmaps_live(vm, "disk1")}

    disk0 = dict(dest_dir=str(dest), set_name="db01-disk0")
    expected = {
        full["sets"][0]["backup"]["id"]: [(0xA0, 0), (0, 2 * MIB), (0, 4 * MIB)],
        inc1["sets"][0]["backup"]["id"]: [(0xA0, 0), (0xB0, 2 * MIB), (0, 4 * MIB)],
        inc2["backup"]["id"]: [(0xA0, 0), (0xB0, 2 * MIB), (0xC0, 4 * MIB)],
    }
    for backup_id, patterns in expected.items():
        target = tmp_path / f"r-{backup_id}.qcow2"
        ok(state="restored", backup_id=backup_id, restore_to=str(target), **disk0)
        assert all(reads(target, pattern, offset) for pattern, offset in patterns), backup_id
    target = tmp_path / "r-disk1.qcow2"
    ok(state="restored", restore_to=str(target), dest_dir=str(dest), set_name="db01-disk1")
    assert reads(target, 0xA1, 0) and reads(target, 0xB1, 2 * MIB)
    assert all(v["ok"] for v in ok(state="verified", **base)["verified"])


def _bitmaps_live(vm: NoOsVm, node: str) -> list[dict[str, t.Any]]:
    with vm.qmp() as qmp:
        for entry in qmp.execute("query-named-block-nodes", {"flat": True}):
            if entry.get("node-name") == node:
                return list(entry.get("dirty-bitmaps") or [])
    return []


def test_restart_keeps_incrementals_and_sigkill_breaks_the_chain(vm: NoOsVm, tmp_path: Path) -> None:
    dest = tmp_path / "backups"
    dest.mkdir()
    base = dict(socket=str(vm.sock), dest_dir=str(dest))
    first = ok(**base)
    vm.quit()
    vm.start()
    vm.hmp_write("drive0", 0xB0, 0)
    after_restart = ok(mode="incremental", **base)
    assert backups(after_restart)[0][1] == "incremental", after_restart
    assert not after_restart["changed"] or backups(after_restart)[1][2] == first["sets"][1]["backup"]["id"]

    vm.kill()  # SIGKILL: the bitmaps QEMU loaded at start stay marked in-use in the image
    assert "in-use" in bitmaps(vm.disks[0])[after_restart["sets"][0]["bitmap"]]
    vm.start()
    vm.hmp_write("drive0", 0xC0, 0)
    refused = run(on_broken_chain="fail", **base)
    assert refused["failed"] and not refused["changed"]
    assert "cannot take an incremental backup: the bitmap" in refused["msg"] and "is inconsistent" in refused["msg"]
    full = ok(**base)
    assert [mode for dummy, mode, dummy2 in backups(full)] == ["full", "full"]
    assert len(full["warnings"]) == 2 and all("took a FULL backup" in w for w in full["warnings"])
    assert "inconsistent" in full["sets"][0]["backup"]["full_reason"]
    names = {b["name"] for b in _bitmaps_live(vm, "disk0")}
    assert names == {full["sets"][0]["bitmap"]}  # the inconsistent bitmap of the old chain is gone
    assert {b["name"] for b in _bitmaps_live(vm, "disk1")} == {FOREIGN, full["sets"][1]["bitmap"]}

    with vm.qmp() as qmp:
        qmp.execute("block-dirty-bitmap-remove", {"node": "disk1", "name": full["sets"][1]["bitmap"]})
    vm.hmp_write("drive1", 0xD1, 0)
    vm.hmp_write("drive0", 0xD0, 0)
    again = ok(**base)
    assert [mode for dummy, mode, dummy2 in backups(again)] == ["incremental", "full"]
    assert "is missing on the disk" in again["sets"][1]["backup"]["full_reason"]
    target = tmp_path / "r.qcow2"
    ok(state="restored", restore_to=str(target), dest_dir=str(dest), set_name="db01-disk1")
    assert reads(target, 0xD1, 0)
