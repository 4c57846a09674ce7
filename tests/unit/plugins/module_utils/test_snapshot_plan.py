# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Planning decisions for qcow2_snapshot, on images parsed from recorded qemu-img output."""

from __future__ import annotations

import copy

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ImageInUseError, ValidationError
from ansible_collections.vmsnap.qemu.plugins.module_utils._image import parse_info
from ansible_collections.vmsnap.qemu.plugins.module_utils._retention import RetentionPolicy
from ansible_collections.vmsnap.qemu.plugins.module_utils._snapshot import plan_image

NOW = 1_900_000_000.0


@pytest.fixture
def base_doc(recorded):
    """The recorded base image: snapshots pre-upgrade(1), dup(2), dup(3), 7(4) and bitmap bm0."""
    return recorded.json("info-chain-top-over-base-with-snapshots-and-bitmap.json")[1]


def without_bitmaps(doc):
    doc = copy.deepcopy(doc)
    doc["format-specific"]["data"].pop("bitmaps")
    return doc


def test_present_creates_only_when_missing(base_doc) -> None:
    info = parse_info(base_doc)
    assert plan_image("/b", info, "present", "new", None, NOW).create is True
    existing = plan_image("/b", info, "present", "pre-upgrade", None, NOW)
    assert existing.create is False and existing.changed is False


def test_present_prediction_appends_new_name(base_doc) -> None:
    plan = plan_image("/b", parse_info(base_doc), "present", "new", None, NOW)
    assert plan.names_before() == ["pre-upgrade", "dup", "dup", "7"]
    assert plan.names_after() == ["pre-upgrade", "dup", "dup", "7", "new"]
    assert plan.predicted_snapshots()[-1]["id"] is None


def test_absent_deletes_only_when_present(base_doc) -> None:
    info = parse_info(base_doc)
    plan = plan_image("/b", info, "absent", "pre-upgrade", None, NOW)
    assert plan.delete is not None and plan.delete.id == "1"
    assert plan.names_after() == ["dup", "dup", "7"]
    assert plan_image("/b", info, "absent", "gone", None, NOW).changed is False


@pytest.mark.parametrize("state", ["absent", "reverted"])
def test_ambiguous_names_are_refused_with_ids(base_doc, state: str) -> None:
    with pytest.raises(ValidationError) as info:
        plan_image("/b", parse_info(without_bitmaps(base_doc)), state, "dup", None, NOW)
    assert "ambiguous" in info.value.msg and "2, 3" in info.value.msg
    assert info.value.details["snapshot_ids"] == ["2", "3"]


def test_present_on_a_duplicated_name_is_satisfied(base_doc) -> None:
    assert plan_image("/b", parse_info(base_doc), "present", "dup", None, NOW).changed is False


def test_revert_is_always_a_change(base_doc) -> None:
    plan = plan_image("/b", parse_info(without_bitmaps(base_doc)), "reverted", "pre-upgrade", None, NOW)
    assert plan.revert is not None and plan.changed is True
    assert plan.names_after() == plan.names_before()


def test_revert_of_missing_snapshot_is_refused(base_doc) -> None:
    with pytest.raises(ValidationError, match="does not exist"):
        plan_image("/b", parse_info(without_bitmaps(base_doc)), "reverted", "nosuch", None, NOW)


def test_revert_with_dirty_bitmaps_is_refused_before_qemu_img_fails(base_doc) -> None:
    with pytest.raises(ValidationError, match="bitmap 'bm0' belongs to another tool"):
        plan_image("/b", parse_info(base_doc), "reverted", "pre-upgrade", None, NOW)


def test_raw_image_is_refused(recorded) -> None:
    with pytest.raises(ValidationError, match="raw format; internal snapshots need a qcow2"):
        plan_image("/r", parse_info(recorded.json("info-raw.json")), "present", "x", None, NOW)


@pytest.mark.parametrize(
    ("state", "name"), [("present", "new"), ("absent", "pre-upgrade"), ("reverted", "pre-upgrade")]
)
def test_in_use_image_is_refused_when_a_write_is_needed(base_doc, state: str, name: str) -> None:
    with pytest.raises(ImageInUseError, match="in use by a running QEMU.*qmp_live_snapshot"):
        plan_image("/b", parse_info(without_bitmaps(base_doc), in_use=True), state, name, None, NOW)


def test_in_use_image_with_nothing_to_do_is_fine(base_doc) -> None:
    plan = plan_image("/b", parse_info(base_doc, in_use=True), "present", "pre-upgrade", None, NOW)
    assert plan.changed is False


def test_corrupt_image_is_not_written(base_doc) -> None:
    doc = copy.deepcopy(base_doc)
    doc["format-specific"]["data"]["corrupt"] = True
    with pytest.raises(ValidationError, match="marked corrupt"):
        plan_image("/b", parse_info(doc), "present", "new", None, NOW)


def test_prune_skips_a_name_shared_with_a_kept_snapshot(base_doc) -> None:
    doc = copy.deepcopy(base_doc)
    doc["snapshots"][2]["date-sec"] += 10  # dup(3) is newer than dup(2)
    plan = plan_image("/b", parse_info(doc), "pruned", None, RetentionPolicy(match="dup", keep=1), NOW)
    assert plan.prune == []
    assert any("same name" in warning for warning in plan.warnings)


def test_prune_deletes_all_twins_when_all_are_doomed(base_doc) -> None:
    plan = plan_image("/b", parse_info(base_doc), "pruned", None, RetentionPolicy(match="d*", keep=0), NOW)
    assert [snap.id for snap in plan.prune] == ["2", "3"]


def test_present_with_retention_protects_the_new_snapshot(base_doc) -> None:
    plan = plan_image("/b", parse_info(base_doc), "present", "pre-2", RetentionPolicy(match="pre-*", keep=1), NOW)
    assert plan.create is True
    assert [snap.name for snap in plan.prune] == ["pre-upgrade"]
    assert plan.names_after() == ["dup", "dup", "7", "pre-2"]


def test_many_snapshots_warning(base_doc) -> None:
    doc = copy.deepcopy(base_doc)
    doc["snapshots"] = [dict(doc["snapshots"][0], id=str(i), name=f"s{i}") for i in range(1, 11)]
    assert plan_image("/b", parse_info(doc), "present", "s1", None, NOW).warnings == []
    warnings = plan_image("/b", parse_info(doc), "present", "s11", None, NOW).warnings
    assert len(warnings) == 1 and "11 internal snapshots" in warnings[0]
