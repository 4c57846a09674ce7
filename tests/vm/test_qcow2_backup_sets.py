# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""qcow2_backup and what is in a set folder besides its index: a lost index never costs the backups, and an
unrecorded file that a recorded backup really builds on is never cleaned away (real qemu-img, module in-process)."""

from __future__ import annotations

import json
from pathlib import Path

from qcow2_backup_helpers import MIB, first_data_offset, flip_byte, new_image, ok, qemu_img, reads, run, tree, write


def disk_and_dest(tmp_path: Path) -> tuple[Path, Path]:
    """web01.qcow2 with pattern 0xAA in its first MiB, and an empty dest_dir."""
    disk = new_image(tmp_path / "web01.qcow2")
    write(disk, 0xAA, 0)
    dest = tmp_path / "backups"
    dest.mkdir()
    return disk, dest


def test_a_lost_index_is_refused_and_the_backups_are_kept(tmp_path: Path) -> None:
    disk, dest = disk_and_dest(tmp_path)
    ok(path=str(disk), dest_dir=str(dest))
    write(disk, 0xBB, MIB)
    ok(path=str(disk), dest_dir=str(dest))
    (dest / "web01" / "index.json").rename(tmp_path / "index.json")  # lost or moved by hand
    before = tree(dest)
    for check in (True, False):
        result = run(check=check, path=str(disk), dest_dir=str(dest))
        assert result["failed"], result
        assert "holds backup files" in result["msg"] and "but no index.json" in result["msg"], result["msg"]
        assert tree(dest) == before


def test_an_unrecorded_file_that_a_recorded_backup_builds_on_is_kept(tmp_path: Path) -> None:
    """A prune killed after it renamed a merged file but before its index write leaves the index naming the old
    parent; if the index also lost the entry of the file really used, the clean-up must not delete that file."""
    disk, dest = disk_and_dest(tmp_path)
    full = ok(path=str(disk), dest_dir=str(dest))["backup"]
    write(disk, 0xBB, MIB)
    inc = ok(path=str(disk), dest_dir=str(dest))["backup"]
    index_path = dest / "web01" / "index.json"
    index = json.loads(index_path.read_text())
    index["backups"] = [entry for entry in index["backups"] if entry["id"] != full["id"]]
    index["backups"][0].update(parent=None, mode="full")  # the index says standalone; the file still says otherwise
    index_path.write_text(json.dumps(index))
    write(disk, 0xCC, 2 * MIB)
    result = run(path=str(disk), dest_dir=str(dest))
    assert Path(full["file"]).exists(), result
    assert full["file"].rsplit("/", 1)[1] not in result["sets"][0]["cleaned"]
    assert reads(Path(inc["file"]), 0xBB, MIB) and reads(Path(inc["file"]), 0xAA, 0)
    assert "backing-filename" in qemu_img("info", "--output=json", inc["file"])


def test_a_backup_taken_before_a_failed_prune_is_reported_as_a_change(tmp_path: Path) -> None:
    """present + retention: the backup is recorded, then the prune refuses (a damaged parent it would merge); the
    task fails, and says that it changed something and what."""
    disk, dest = disk_and_dest(tmp_path)
    ok(path=str(disk), dest_dir=str(dest))
    write(disk, 0xBB, MIB)
    damaged = Path(ok(path=str(disk), dest_dir=str(dest))["backup"]["file"])
    flip_byte(damaged, first_data_offset(damaged))
    write(disk, 0xCC, 2 * MIB)
    result = run(path=str(disk), dest_dir=str(dest), retention={"keep": 1}, verify=False)
    assert result["failed"] and result["changed"], result
    index = json.loads((dest / "web01" / "index.json").read_text())
    newest = index["backups"][-1]["id"]
    assert result["backups_recorded"] == [f"web01/{newest}"] and f"web01/{newest}" in result["msg"], result
    assert len(index["backups"]) == 3  # nothing pruned
