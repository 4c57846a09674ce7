# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError
from ansible_collections.vmsnap.qemu.plugins.module_utils._image import Snapshot
from ansible_collections.vmsnap.qemu.plugins.module_utils._retention import RetentionPolicy, parse_duration

DAY = 86400
NOW = 1_800_000_000.0


def snap(snap_id: int, name: str, age_days: float) -> Snapshot:
    return Snapshot(id=str(snap_id), name=name, vm_state_size=0, date_epoch=NOW - age_days * DAY, vm_clock=0.0)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("7d", 7 * DAY),
        ("2w", 14 * DAY),
        (3600, 3600),
        (" 3d ", 3 * DAY),
    ],
)
def test_parse_duration(value, seconds: int) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "7 days", "d7", "-1d", "1.5h", "0", 0, True, "7y"])
def test_parse_duration_refuses(value) -> None:
    with pytest.raises(ValidationError):
        parse_duration(value)


def test_policy_requires_match() -> None:
    with pytest.raises(ValidationError, match="retention needs 'match'"):
        RetentionPolicy.from_params({"keep": 3, "max_age": None, "match": None})


def test_policy_requires_keep_or_max_age() -> None:
    with pytest.raises(ValidationError, match="'keep', 'max_age' or both"):
        RetentionPolicy.from_params({"keep": None, "max_age": None, "match": "auto-*"})


def test_policy_refuses_negative_keep() -> None:
    with pytest.raises(ValidationError, match="0 or more"):
        RetentionPolicy.from_params({"keep": -1, "max_age": None, "match": "auto-*"})


def test_no_policy_when_not_given() -> None:
    assert RetentionPolicy.from_params(None) is None


SNAPS = [
    snap(1, "auto-a", 10),
    snap(2, "manual", 30),
    snap(3, "auto-b", 5),
    snap(4, "auto-c", 1),
    snap(5, "AUTO-d", 40),
    snap(6, "auto-e", 0.5),
]


def names(snaps) -> list[str]:
    return [s.name for s in snaps]


def test_keep_newest_only_touches_matching_names() -> None:
    policy = RetentionPolicy(match="auto-*", keep=2)
    assert names(policy.select(SNAPS, now=NOW)) == ["auto-a", "auto-b"]


def test_max_age_only() -> None:
    policy = RetentionPolicy(match="auto-*", max_age=7 * DAY)
    assert names(policy.select(SNAPS, now=NOW)) == ["auto-a"]


def test_keep_and_max_age_delete_what_either_rule_rejects() -> None:
    policy = RetentionPolicy(match="auto-*", keep=3, max_age=2 * DAY)
    assert names(policy.select(SNAPS, now=NOW)) == ["auto-a", "auto-b"]


def test_keep_zero_deletes_every_match() -> None:
    policy = RetentionPolicy(match="auto-*", keep=0)
    assert names(policy.select(SNAPS, now=NOW)) == ["auto-a", "auto-b", "auto-c", "auto-e"]


def test_match_is_case_sensitive() -> None:
    policy = RetentionPolicy(match="AUTO-*", keep=0)
    assert names(policy.select(SNAPS, now=NOW)) == ["AUTO-d"]


def test_protected_snapshot_counts_towards_keep_and_is_never_selected() -> None:
    policy = RetentionPolicy(match="auto-*", keep=2, max_age=DAY * 0.1)
    # auto-new is being created now: it takes one of the two slots and is never pruned itself.
    selected = policy.select(SNAPS, now=NOW, protect="auto-new")
    assert names(selected) == ["auto-a", "auto-b", "auto-c", "auto-e"]
    selected = RetentionPolicy(match="auto-*", keep=2).select(SNAPS, now=NOW, protect="auto-new")
    assert names(selected) == ["auto-a", "auto-b", "auto-c"]


def test_protected_name_outside_match_takes_no_slot() -> None:
    selected = RetentionPolicy(match="auto-*", keep=2).select(SNAPS, now=NOW, protect="manual")
    assert names(selected) == ["auto-a", "auto-b"]


def test_same_date_breaks_ties_by_id() -> None:
    twins = [snap(1, "auto-x", 1), snap(2, "auto-y", 1)]
    assert names(RetentionPolicy(match="auto-*", keep=1).select(twins, now=NOW)) == ["auto-x"]
