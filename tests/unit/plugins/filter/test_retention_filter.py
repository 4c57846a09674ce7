# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import time

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.vmsnap.qemu.plugins.filter.retention import FilterModule, retention_select

DAY = 86400
NOW = 1_796_090_400.0  # 2026-12-01T02:00:00Z


def items(*ages_in_days: float) -> list[dict]:
    return [{"name": f"auto-{index}", "epoch": NOW - age * DAY} for index, age in enumerate(ages_in_days)]


def test_registered_under_its_name() -> None:
    assert FilterModule().filters()["retention_select"] is retention_select


def test_keep_and_remove_newest_first() -> None:
    result = retention_select(items(3, 0, 1, 2), {"keep": 2}, now=NOW)
    assert result == {"keep": ["auto-1", "auto-2"], "remove": ["auto-3", "auto-0"]}


def test_period_rules_and_max_age() -> None:
    # One a day for 40 days up to 2026-12-01: daily 3 keeps Dec 1, Nov 30, Nov 29, which cover December and
    # November, so monthly 2 takes October's newest (Oct 31, 31 days old) and then runs out of months.
    daily = items(*range(40))
    result = retention_select(daily, {"keep_daily": 3, "keep_monthly": 2}, now=NOW)
    assert result["keep"] == ["auto-0", "auto-1", "auto-2", "auto-31"]
    result = retention_select(daily, {"keep_daily": 3, "keep_monthly": 2, "max_age": "20d"}, now=NOW)
    assert result["keep"] == ["auto-0", "auto-1", "auto-2"]
    assert len(result["remove"]) == 37  # max_age drops October's


def test_date_epoch_of_snapshot_lists_is_accepted() -> None:
    snapshots = [
        {"id": "1", "name": "auto-a", "date_epoch": NOW - 2 * DAY, "vm_clock": 0.0},
        {"id": "2", "name": "auto-b", "date_epoch": NOW - DAY, "vm_clock": 0.0},
    ]
    assert retention_select(snapshots, {"keep": 1}, now=NOW) == {"keep": ["auto-b"], "remove": ["auto-a"]}


def test_a_generator_is_accepted_as_jinja_selectattr_gives_one() -> None:
    result = retention_select((entry for entry in items(1, 0)), {"keep": 1}, now=NOW)
    assert result == {"keep": ["auto-1"], "remove": ["auto-0"]}


def test_protect_and_newest() -> None:
    assert retention_select(items(5, 0, 9), {"max_age": "1d"}, now=NOW, protect=["auto-2"]) == {
        "keep": ["auto-1", "auto-2"],
        "remove": ["auto-0"],
    }
    assert retention_select(items(5, 9), {"keep": 0}, now=NOW, protect="auto-1") == {
        "keep": ["auto-0", "auto-1"],
        "remove": [],
    }


def test_now_defaults_to_the_clock() -> None:
    recent = [{"name": "young", "epoch": time.time() - 10}, {"name": "old", "epoch": time.time() - 7200}]
    assert retention_select(recent, {"max_age": "1h"}) == {"keep": ["young"], "remove": ["old"]}


def test_no_rules_keep_everything() -> None:
    assert retention_select(items(1, 2), {}, now=NOW) == {"keep": ["auto-0", "auto-1"], "remove": []}
    assert retention_select([], {"keep": 1}, now=NOW) == {"keep": [], "remove": []}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("not a list", {"keep": 1}), "expects a list of {name, epoch} dicts, not 'not a list'"),
        (({"name": "a"}, {"keep": 1}), "expects a list of {name, epoch} dicts"),
        ((["a"], {"keep": 1}), "item 0 must be a dict with 'name' and 'epoch', not 'a'"),
        (([{"epoch": 1}], {"keep": 1}), "item 0 has no 'name'"),
        (([{"name": "a"}], {"keep": 1}), "item 'a' has no 'epoch' (or 'date_epoch')"),
        (([{"name": "a", "epoch": "today"}], {"keep": 1}), "Item 'a' has no valid time: 'today'"),
        (([{"name": "a", "epoch": 1}, {"name": "a", "epoch": 2}], {"keep": 1}), "Item 'a' appears more than once"),
        ((items(1), {"keep": -1}), "retention_select: retention.keep must be 0 or more, not -1."),
        ((items(1), {"keep_weekly": True}), "retention.keep_weekly must be a whole number (0 or more), not True."),
        ((items(1), {"keep": "three"}), "retention.keep must be a whole number (0 or more), not 'three'."),
        ((items(1), {"max_age": "a week"}), "Invalid duration 'a week'"),
        ((items(1), {"keep_yearly": 2}), "unknown rule(s) keep_yearly"),
        ((items(1), ["keep", 1]), "retention must be a dict of rules"),
        ((items(1), {"keep": 1}, "tomorrow"), "now must be seconds since the epoch, not 'tomorrow'"),
        ((items(1), {"keep": 1}, True), "now must be seconds since the epoch, not True"),
        ((items(1), {"keep": 1}, NOW, [1]), "protect must be a list of names, not [1]"),
    ],
)
def test_bad_input_is_a_filter_error(args: tuple, message: str) -> None:
    with pytest.raises(AnsibleFilterError) as caught:
        retention_select(*args)
    assert message in str(caught.value)
