# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The pure half of qcow2_backup: set names, ids, the index on disk, chain health, the present decision, stale
bitmaps and retention plans (which removed backups are merged into which kept ones)."""

from __future__ import annotations

import json
import os
import stat
import typing as t
from pathlib import Path

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils import _backup as B
from ansible_collections.vmsnap.qemu.plugins.module_utils import _backup_execute as X
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError
from ansible_collections.vmsnap.qemu.plugins.module_utils._retention import PeriodRules

DAY = 86400.0
NOW = 1796212800.0  # 2026-12-02T12:00:00Z


@pytest.mark.parametrize(
    ("image", "name"),
    [
        ("/var/lib/vm/web01-disk0.qcow2", "web01-disk0"),
        ("/var/lib/vm/db 01 (data).img", "db_01__data_"),
        ("/var/lib/vm/noext", "noext"),
        ("/var/lib/vm/.hidden.qcow2", "hidden"),
        ("/var/lib/vm/ünï.qcow2", "_n_"),
    ],
)
def test_default_set_name(image: str, name: str) -> None:
    assert B.default_set_name(image) == name
    assert B.validate_set_name(name) == name


@pytest.mark.parametrize("bad", ["", "../x", ".x", "a/b", "a b", "x" * 201, None])
def test_bad_set_names(bad: t.Any) -> None:
    with pytest.raises(ValidationError):
        B.validate_set_name(bad)


def test_backup_ids_and_names() -> None:
    assert B.new_backup_id(NOW - 43200, ()) == "20261202T000000Z"
    assert B.new_backup_id(NOW - 43200, {"20261202T000000Z", "20261202T000000Z-2"}) == "20261202T000000Z-3"
    assert B.backup_file_name("20261202T000000Z", "full") == "20261202T000000Z.full.qcow2"
    assert B.backup_file_name("20261202T000000Z-2", "incremental") == "20261202T000000Z-2.inc.qcow2"
    assert B.is_backup_file_name("20261202T000000Z-2.inc.qcow2") and not B.is_backup_file_name("x.inc.qcow2")
    assert B.validate_backup_id("20261202T000000Z-2") == "20261202T000000Z-2"
    for bad in ("20261202", "20261202T000000Z-0", "../x", 5):
        with pytest.raises(ValidationError, match="is not a backup id"):
            B.validate_backup_id(bad)
    assert len(B.new_chain_id()) == 8 and B.iso_time(NOW) == "2026-12-02T12:00:00Z"


def test_index_round_trip_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / B.INDEX_NAME
    assert B.read_index(str(path)) is None
    index = B.new_index("web01", "/var/lib/vm/web01.qcow2", 1 << 30)
    B.write_index(str(path), index)
    assert B.read_index(str(path)) == index
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and os.listdir(tmp_path) == [B.INDEX_NAME]
    path.write_text("{not json")
    with pytest.raises(ValidationError, match="is not valid JSON"):
        B.read_index(str(path))
    path.write_text(json.dumps({"format": 2, "backups": []}))
    with pytest.raises(ValidationError, match="not a vmsnap.qemu backup index of format 1"):
        B.read_index(str(path))


def test_dest_dir_and_set_checks(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="is relative"):
        B.check_dest_dir("backups")
    with pytest.raises(ValidationError, match="does not exist; create it first"):
        B.check_dest_dir(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValidationError, match="is not a folder"):
        B.check_dest_dir(str(tmp_path / "file"))
    assert B.check_dest_dir(str(tmp_path)) == str(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(ValidationError, match="is not a folder \\(or is a symlink\\)"):
        B.check_set_folder(str(tmp_path / "link"))
    index = B.new_index("web01", "/a.qcow2", 1)
    with pytest.raises(ValidationError, match="belongs to another disk \\(/a.qcow2\\), not to /b.qcow2"):
        B.check_index_source(index, "/d/web01/index.json", "/b.qcow2")


def _index(*entries: tuple[str, str, str | None, float], bitmap: str = "vmsnap-backup-web01-0011aabb") -> dict:
    index = B.new_index("web01", "/a.qcow2", 1 << 20)
    for backup_id, mode, parent, epoch in entries:
        index["backups"].append(
            {"id": backup_id, "mode": mode, "parent": parent, "epoch": epoch, "chain": "0011aabb",
             "file": B.backup_file_name(backup_id, mode)}
        )  # fmt: skip
    index["chain"], index["bitmap"] = "0011aabb", bitmap
    return index


HEALTHY = {"vmsnap-backup-web01-0011aabb": B.BitmapView("vmsnap-backup-web01-0011aabb", True, False, 0)}


def test_broken_chain_reasons() -> None:
    index = _index(("F", "full", None, NOW))
    exists: t.Callable[[str], bool] = lambda path: True  # noqa: E731
    assert B.broken_chain_reason(None, {}, "/d", 1 << 20) is None
    assert B.broken_chain_reason(index, HEALTHY, "/d", 1 << 20, exists) is None
    assert "missing on the disk" in str(B.broken_chain_reason(index, {}, "/d", 1 << 20, exists))
    view = B.BitmapView("vmsnap-backup-web01-0011aabb", True, True)
    assert "is inconsistent" in str(B.broken_chain_reason(index, {view.name: view}, "/d", 1 << 20, exists))
    view = B.BitmapView("vmsnap-backup-web01-0011aabb", False, False)
    assert "is disabled" in str(B.broken_chain_reason(index, {view.name: view}, "/d", 1 << 20, exists))
    assert "virtual size changed" in str(B.broken_chain_reason(index, HEALTHY, "/d", 2 << 20, exists))
    assert "F.full.qcow2 is missing" in str(B.broken_chain_reason(index, HEALTHY, "/d", 1 << 20, lambda p: False))
    index["pending"] = {"id": "X", "time": "T"}
    assert B.broken_chain_reason(index, HEALTHY, "/d", 1 << 20, exists) == (
        "the backup X of T was interrupted, so the state of the disk's bitmap is unknown"
    )


def test_bitmaps_from_qemu_img_flags() -> None:
    class Flags(t.NamedTuple):
        name: str
        flags: tuple[str, ...]

    views = B.bitmaps_from_flags([Flags("a", ("auto",)), Flags("b", ("in-use", "auto")), Flags("c", ())])
    assert [(v.recording, v.inconsistent) for v in views.values()] == [(True, False), (True, True), (False, False)]


def test_decide_present() -> None:
    empty = B.new_index("web01", "/a", 1)
    one = _index(("F", "full", None, NOW))
    assert B.decide_present(empty, "auto", None, "full", True, None, "web01").action == "full"
    with pytest.raises(ValidationError, match="mode=incremental but the set web01 has no full backup yet"):
        B.decide_present(None, "incremental", None, "full", True, None, "web01")
    assert B.decide_present(one, "auto", None, "full", True, 0, "web01").action == "none"
    assert B.decide_present(one, "full", None, "full", True, 0, "web01").action == "none"
    assert B.decide_present(one, "full", None, "full", False, 0, "web01").full_reason == "mode=full"
    assert B.decide_present(one, "auto", None, "full", True, 4096, "web01").action == "incremental"
    broken = B.decide_present(one, "incremental", "the bitmap is gone", "full", True, None, "web01")
    assert (broken.action, broken.full_reason) == ("full", "the bitmap is gone")
    assert "took a FULL backup instead of an incremental one because the bitmap is gone" in str(broken.warning)
    with pytest.raises(B.BrokenChainError, match="on_broken_chain=fail, so nothing was written"):
        B.decide_present(one, "auto", "the bitmap is gone", "fail", True, None, "web01")
    assert B.decide_present(one, "full", "x", "fail", True, None, "web01").warning is None


def test_own_stale_bitmaps_never_lists_other_sets_or_tools() -> None:
    names = ["vmsnap-backup-web01-0011aabb", "vmsnap-backup-web01-deadbeef", "vmsnap-backup-web02-deadbeef",
             "other-tool", "vmsnap-backup-web01-XYZ"]  # fmt: skip
    chains = {"0011aabb", "deadbeef"}
    assert B.own_stale_bitmaps("web01", names, {"vmsnap-backup-web01-0011aabb"}, chains) == [
        "vmsnap-backup-web01-deadbeef"
    ]


def test_a_set_of_the_same_name_in_another_folder_keeps_its_bitmap() -> None:
    """Two dest_dirs back up one disk into sets of the same name: each removes only chains it started."""
    index = B.new_index("web01", "/v/web01.qcow2", 1 << 20)
    B.remember_chain(index, "0011aabb")
    B.remember_chain(index, "0011aabb")
    assert index["chains"] == ["0011aabb"]
    index["chain"], index["bitmap"] = "22223333", "vmsnap-backup-web01-22223333"
    names = ["vmsnap-backup-web01-0011aabb", "vmsnap-backup-web01-22223333", "vmsnap-backup-web01-cafef00d"]
    assert B.known_chains(index) == {"0011aabb", "22223333"}
    stale = B.own_stale_bitmaps("web01", names, {index["bitmap"]}, B.known_chains(index))
    assert stale == ["vmsnap-backup-web01-0011aabb"]  # cafef00d is the other folder's chain


def test_chain_to_and_find_backup() -> None:
    index = _index(("F", "full", None, 1), ("I1", "incremental", "F", 2), ("I2", "incremental", "I1", 3))
    assert [e["id"] for e in B.chain_to(index, "I2")] == ["F", "I1", "I2"]
    with pytest.raises(ValidationError, match="Backup X does not exist in the set web01; it has F, I1, I2"):
        B.find_backup(index, "X", "web01")
    index["backups"][1]["parent"] = "gone"
    with pytest.raises(B.BackupError, match="inconsistent"):
        B.chain_to(index, "I2")


def _plan(index: dict, **rules: t.Any) -> B.PrunePlan:
    return B.plan_prune(index, PeriodRules.from_params(rules), NOW)


def test_prune_merges_removed_ancestors_into_kept_backups() -> None:
    index = _index(
        ("F1", "full", None, NOW - 5 * DAY),
        ("I1", "incremental", "F1", NOW - 4 * DAY),
        ("I2", "incremental", "I1", NOW - 3 * DAY),
        ("F2", "full", None, NOW - 2 * DAY),
        ("I3", "incremental", "F2", NOW - DAY),
    )
    plan = _plan(index, keep=1)
    assert plan.remove == ["F1", "I1", "I2", "F2"] and plan.rebase == [("I3", None)] and plan.kept == ["I3"]
    plan = _plan(index, keep=2)
    assert plan.remove == ["F1", "I1", "I2"] and plan.rebase == [] and plan.kept == ["F2", "I3"]
    plan = _plan(index, keep_daily=3, max_age="10d")
    assert plan.kept == ["I2", "F2", "I3"] and plan.rebase == [("I2", None)]
    index["backups"][1]["epoch"] = NOW - 2.5 * DAY  # I1 moves into I2's day... and I2 stays newest there
    index["backups"][2]["epoch"] = NOW - 2.4 * DAY
    plan = _plan(index, keep=0, keep_daily=3)
    assert "I3" in plan.kept and all(new_parent in plan.kept or new_parent is None for dummy, new_parent in plan.rebase)
    B.apply_prune(index, plan)
    ids = [e["id"] for e in index["backups"]]
    assert ids == plan.kept and all(e["parent"] in ids or e["mode"] == "full" for e in index["backups"])


def test_prune_rebases_onto_the_nearest_kept_ancestor() -> None:
    index = _index(
        ("F", "full", None, NOW - 3 * DAY),
        ("I1", "incremental", "F", NOW - 2 * DAY - 60),
        ("I2", "incremental", "I1", NOW - 2 * DAY),
        ("I3", "incremental", "I2", NOW - 10),
    )
    plan = _plan(index, keep_daily=3)
    assert plan.remove == ["I1"] and plan.rebase == [("I2", "F")] and plan.kept == ["F", "I2", "I3"]
    B.apply_prune(index, plan)
    assert [(e["id"], e["parent"], e["mode"]) for e in index["backups"]] == [
        ("F", None, "full"),
        ("I2", "F", "incremental"),
        ("I3", "I2", "incremental"),
    ]


def test_merges_read_the_kept_backup_and_the_removed_ancestors_it_absorbs() -> None:
    """What a prune verifies before it merges: the rebased kept backup and each removed ancestor up to its new
    parent (the merged file gets a fresh checksum); nothing when no kept backup is rebased."""
    index = _index(
        ("F", "full", None, NOW - 3 * DAY),
        ("I1", "incremental", "F", NOW - 2 * DAY - 60),
        ("I2", "incremental", "I1", NOW - 2 * DAY),
        ("I3", "incremental", "I2", NOW - 10),
    )
    assert X.merged_backups(index, _plan(index, keep_daily=3)) == ["I2", "I1"]
    assert X.merged_backups(index, _plan(index, keep=1)) == ["I3", "I2", "I1", "F"]
    assert X.merged_backups(index, _plan(index, keep=2)) == ["I2", "I1", "F"]
    two_chains = _index(
        ("F1", "full", None, NOW - 3 * DAY),
        ("F2", "full", None, NOW - 2 * DAY),
        ("I", "incremental", "F2", NOW - DAY),
    )
    assert X.merged_backups(two_chains, _plan(two_chains, keep=2)) == []


def test_prune_never_removes_the_newest() -> None:
    index = _index(("F", "full", None, NOW - 400 * DAY), ("I", "incremental", "F", NOW - 300 * DAY))
    plan = _plan(index, max_age="1d")
    assert plan.kept == ["I"] and plan.remove == ["F"] and plan.rebase == [("I", None)]
    assert not _plan(B.new_index("x", "/a", 1), keep=1).changed


def test_leftovers(tmp_path: Path) -> None:
    index = _index(("F", "full", None, 1))
    for name in ("F.full.qcow2", "20261202T000000Z.inc.qcow2", ".tmp-x.qcow2", "index.json", "notes.txt"):
        (tmp_path / name).write_text("")
    assert B.leftover_temp_files(str(tmp_path)) == [".tmp-x.qcow2"]
    assert B.unrecorded_backup_files(str(tmp_path), index) == ["20261202T000000Z.inc.qcow2"]
    assert B.leftover_temp_files(str(tmp_path / "missing")) == []
