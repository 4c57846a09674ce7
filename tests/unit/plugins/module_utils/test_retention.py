# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import datetime
import random

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError
from ansible_collections.vmsnap.qemu.plugins.module_utils._image import Snapshot
from ansible_collections.vmsnap.qemu.plugins.module_utils._retention import (
    PeriodRules,
    RetentionPolicy,
    parse_duration,
    select_keep,
)

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


# --- PeriodRules and select_keep: Proxmox Backup Server prune semantics -------------------------------------------


def at(stamp: str) -> float:
    """'2026-03-01T02:00:00Z' -> epoch seconds (UTC)."""
    moment = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def stamped(*stamps: str) -> list[tuple[str, float]]:
    """Items whose ids are their own times, so the expected sets read like the PBS simulator's."""
    return [(stamp, at(stamp)) for stamp in stamps]


def daily_items(first: str, days: int) -> list[tuple[str, float]]:
    start = at(first)
    return [(_iso(start + index * DAY), start + index * DAY) for index in range(days)]


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def kept(items, now: float | None = None, protect=(), **rules) -> list[str]:
    newest = max((epoch for dummy, epoch in items), default=0.0)
    keep, remove = select_keep(items, PeriodRules(**rules), now if now is not None else newest + 60, protect=protect)
    assert sorted(keep + remove) == sorted(item_id for item_id, dummy in items)
    return sorted(keep)


def test_pbs_simulator_daily_backups_for_60_days() -> None:
    # One backup a day at 02:00 from 2026-01-01 (a Thursday) to 2026-03-01 (a Sunday, end of ISO week 9).
    items = daily_items("2026-01-01T02:00:00Z", 60)
    assert kept(items, keep=3, keep_daily=7, keep_weekly=4, keep_monthly=6) == sorted(
        [
            # keep-last 3
            "2026-03-01T02:00:00Z",
            "2026-02-28T02:00:00Z",
            "2026-02-27T02:00:00Z",
            # keep-daily 7: the next seven days
            "2026-02-26T02:00:00Z",
            "2026-02-25T02:00:00Z",
            "2026-02-24T02:00:00Z",
            "2026-02-23T02:00:00Z",
            "2026-02-22T02:00:00Z",
            "2026-02-21T02:00:00Z",
            "2026-02-20T02:00:00Z",
            # keep-weekly 4: weeks 9 and 8 are covered already; the Sundays of weeks 7, 6, 5, 4
            "2026-02-15T02:00:00Z",
            "2026-02-08T02:00:00Z",
            "2026-02-01T02:00:00Z",
            "2026-01-25T02:00:00Z",
            # keep-monthly 6: March, February and January are covered, and there is no older month
        ]
    )


def test_pbs_simulator_monthly_reaches_back_past_the_weeks() -> None:
    # Daily for 120 days (2025-11-03 .. 2026-03-02): monthly keeps the last day of each older month.
    items = daily_items("2025-11-03T02:00:00Z", 120)
    result = kept(items, keep_daily=2, keep_weekly=2, keep_monthly=6)
    assert result == sorted(
        [
            "2026-03-02T02:00:00Z",  # daily (a Monday: ISO week 10)
            "2026-03-01T02:00:00Z",  # daily (Sunday, week 9)
            "2026-02-22T02:00:00Z",  # weekly: week 8 (week 10 and 9 are covered)
            "2026-02-15T02:00:00Z",  # weekly: week 7
            "2026-01-31T02:00:00Z",  # monthly: March and February are covered
            "2025-12-31T02:00:00Z",
            "2025-11-30T02:00:00Z",
        ]
    )


# The cases of PBS's own prune tests (tests/prune.rs), as kept sets.
PBS_SIMPLE = stamped("2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z", "2019-12-04T12:59:15Z")
PBS_SIMPLE2 = stamped(
    "2018-11-15T11:59:15Z",
    "2019-11-15T11:59:15Z",
    "2019-11-21T11:59:15Z",
    "2019-11-22T11:59:15Z",
    "2019-11-29T11:59:15Z",
    "2019-12-01T11:59:15Z",
    "2019-12-02T11:59:15Z",
    "2019-12-03T11:59:15Z",
    "2019-12-04T11:59:15Z",
)


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ({"keep": 4}, [0, 1, 2, 3]),
        ({"keep": 3}, [1, 2, 3]),
        ({"keep": 2}, [2, 3]),
        ({"keep": 1}, [3]),
        ({"keep": 2, "keep_daily": 2}, [0, 1, 2, 3]),
        ({"keep_daily": 3}, [0, 1, 3]),
        ({"keep_daily": 2}, [1, 3]),
        ({"keep_weekly": 5}, [3]),  # all in one week: one item
        ({"keep_daily": 1, "keep_weekly": 5}, [3]),
        ({"keep_monthly": 6}, [3]),
        ({"keep_weekly": 5, "keep_monthly": 6}, [3]),
    ],
)
def test_pbs_prune_tests_simple(rules: dict, expected: list[int]) -> None:
    assert kept(PBS_SIMPLE, **rules) == sorted(PBS_SIMPLE[index][0] for index in expected)


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ({"keep_daily": 1}, ["2019-12-04T11:59:15Z"]),
        ({"keep": 1, "keep_daily": 1}, ["2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"]),
        # 2019-12-01 is the Sunday of the week before the newest one
        ({"keep_daily": 1, "keep_weekly": 1}, ["2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"]),
        # weekly marked 11-29 (same week as 12-01) for removal, so monthly takes November's next one, 11-22
        (
            {"keep_daily": 1, "keep_weekly": 1, "keep_monthly": 1},
            ["2019-11-22T11:59:15Z", "2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"],
        ),
    ],
)
def test_pbs_prune_tests_simple2(rules: dict, expected: list[str]) -> None:
    assert kept(PBS_SIMPLE2, **rules) == expected


def test_keep_zero_keeps_only_the_newest_where_pbs_would_remove_all() -> None:
    assert kept(PBS_SIMPLE, keep=0) == ["2019-12-04T12:59:15Z"]
    assert kept(PBS_SIMPLE, keep=0, keep_daily=0, keep_weekly=0, keep_monthly=0) == ["2019-12-04T12:59:15Z"]
    keep, remove = select_keep(PBS_SIMPLE, PeriodRules(keep=0), now=NOW, keep_newest=False)
    assert keep == []
    assert remove == [item_id for item_id, dummy in reversed(PBS_SIMPLE)]


def test_each_rule_counts_only_its_own_periods() -> None:
    # Four a day for three days: keep-last takes the newest two (both of the last day); daily does not count that
    # day again but takes the two days before; weekly does not count the week those days are in.
    items = stamped(
        *(f"2026-03-{day:02d}T{hour:02d}:00:00Z" for day in (4, 5, 6) for hour in (1, 7, 13, 19)),
        "2026-02-25T12:00:00Z",  # the week before
        "2026-02-18T12:00:00Z",  # two weeks before
    )
    assert kept(items, keep=2, keep_daily=2, keep_weekly=2) == sorted(
        [
            "2026-03-06T19:00:00Z",
            "2026-03-06T13:00:00Z",
            "2026-03-05T19:00:00Z",
            "2026-03-04T19:00:00Z",
            "2026-02-25T12:00:00Z",
            "2026-02-18T12:00:00Z",
        ]
    )
    # Without keep-last, daily keeps one item of the newest day.
    assert kept(items, keep_daily=2) == ["2026-03-05T19:00:00Z", "2026-03-06T19:00:00Z"]


def test_iso_week_53_spans_the_new_year() -> None:
    # 2026 has 53 ISO weeks: week 53 runs from Monday 2026-12-28 to Sunday 2027-01-03.
    items = stamped(
        "2026-12-20T10:00:00Z",  # week 51
        "2026-12-27T10:00:00Z",  # week 52 (Sunday)
        "2026-12-28T10:00:00Z",  # week 53 (Monday)
        "2026-12-31T10:00:00Z",  # week 53
        "2027-01-03T10:00:00Z",  # week 53 of 2026, although the calendar says 2027
        "2027-01-04T10:00:00Z",  # 2027 week 1 (Monday)
    )
    assert kept(items, keep_weekly=3) == ["2026-12-27T10:00:00Z", "2027-01-03T10:00:00Z", "2027-01-04T10:00:00Z"]
    # Monthly follows the calendar: December 2026's last item and January 2027's newest.
    assert kept(items, keep_monthly=2) == ["2026-12-31T10:00:00Z", "2027-01-04T10:00:00Z"]


def test_iso_week_one_starts_in_the_old_year() -> None:
    # 2024-12-30 (Monday) is in week 1 of ISO year 2025, together with 2025-01-05.
    items = stamped("2024-12-29T08:00:00Z", "2024-12-30T08:00:00Z", "2025-01-05T08:00:00Z")
    assert kept(items, keep_weekly=2) == ["2024-12-29T08:00:00Z", "2025-01-05T08:00:00Z"]


def test_day_and_month_boundaries_are_utc() -> None:
    items = stamped("2026-01-31T23:59:59Z", "2026-02-01T00:00:00Z", "2026-02-01T00:00:01Z")
    assert kept(items, keep_daily=5) == ["2026-01-31T23:59:59Z", "2026-02-01T00:00:01Z"]
    assert kept(items, keep_monthly=5) == ["2026-01-31T23:59:59Z", "2026-02-01T00:00:01Z"]
    # 2028 is a leap year: 02-29 is a day of its own, in February.
    leap = stamped("2028-02-28T12:00:00Z", "2028-02-29T12:00:00Z", "2028-03-01T00:00:00Z")
    assert kept(leap, keep_daily=3) == sorted(item_id for item_id, dummy in leap)
    assert kept(leap, keep_monthly=3) == ["2028-02-29T12:00:00Z", "2028-03-01T00:00:00Z"]


def test_rules_stop_at_their_count_even_with_gaps() -> None:
    # Periods without items are not counted: keep_daily 3 reaches back over empty days.
    items = stamped("2026-03-10T02:00:00Z", "2026-03-01T02:00:00Z", "2026-02-01T02:00:00Z", "2026-01-01T02:00:00Z")
    assert kept(items, keep_daily=3) == ["2026-02-01T02:00:00Z", "2026-03-01T02:00:00Z", "2026-03-10T02:00:00Z"]


@pytest.mark.parametrize("order", [1, -1])
def test_ties_in_one_second_are_broken_by_id_not_input_order(order: int) -> None:
    second = at("2026-03-01T02:00:00Z")
    items = [("20260301T020000Z", second), ("20260301T020000Z-2", second), ("20260301T020000Z-10", second)][::order]
    keep, remove = select_keep(items, PeriodRules(keep=1), now=second)
    assert keep == ["20260301T020000Z-10"]
    assert remove == ["20260301T020000Z-2", "20260301T020000Z"]
    keep, dummy = select_keep(items, PeriodRules(keep_daily=1), now=second)
    assert keep == ["20260301T020000Z-10"]
    numeric = [("9", second), ("10", second)][::order]
    assert select_keep(numeric, PeriodRules(keep=1), now=second)[0] == ["10"]


def test_results_are_newest_first() -> None:
    items = daily_items("2026-03-01T02:00:00Z", 5)[::-1]
    keep, remove = select_keep(items[2:] + items[:2], PeriodRules(keep=2), now=NOW)
    assert keep == [items[0][0], items[1][0]]
    assert remove == [items[2][0], items[3][0], items[4][0]]


def test_max_age_alone_keeps_everything_younger() -> None:
    now = at("2026-03-10T00:00:00Z")
    items = stamped("2026-03-09T00:00:00Z", "2026-03-03T00:00:00Z", "2026-03-02T23:59:59Z", "2026-02-01T00:00:00Z")
    # exactly 7 days old is not older than 7 days
    assert kept(items, now=now, max_age=7 * DAY) == ["2026-03-03T00:00:00Z", "2026-03-09T00:00:00Z"]


def test_max_age_removes_what_count_rules_keep() -> None:
    now = at("2026-03-10T00:00:00Z")
    items = daily_items("2026-02-01T00:00:00Z", 38)  # up to 2026-03-10
    result = kept(items, now=now, keep_daily=7, keep_monthly=3, max_age=5 * DAY)
    assert result == [_iso(now - days * DAY) for days in range(5, -1, -1)]


def test_count_rules_with_max_age_remove_young_items_no_rule_keeps() -> None:
    now = at("2026-03-10T00:00:00Z")
    items = daily_items("2026-03-01T00:00:00Z", 10)
    assert kept(items, now=now, keep=2, max_age=30 * DAY) == ["2026-03-09T00:00:00Z", "2026-03-10T00:00:00Z"]


def test_newest_is_kept_even_when_every_rule_would_remove_it() -> None:
    now = at("2026-03-10T00:00:00Z")
    items = stamped("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z")
    assert kept(items, now=now, max_age=DAY) == ["2026-01-02T00:00:00Z"]
    assert kept(items, now=now, keep=5, max_age=DAY) == ["2026-01-02T00:00:00Z"]
    assert kept(items, now=now, keep_daily=0) == ["2026-01-02T00:00:00Z"]


def test_protected_items_are_kept_whatever_the_rules_say() -> None:
    now = at("2026-03-10T00:00:00Z")
    items = daily_items("2026-03-01T00:00:00Z", 10)
    assert kept(items, now=now, keep=1, protect=["2026-03-02T00:00:00Z"]) == [
        "2026-03-02T00:00:00Z",
        "2026-03-10T00:00:00Z",
    ]
    assert kept(items, now=now, max_age=DAY, protect={"2026-03-01T00:00:00Z"}) == [
        "2026-03-01T00:00:00Z",
        "2026-03-09T00:00:00Z",
        "2026-03-10T00:00:00Z",
    ]


def test_a_protected_item_a_rule_keeps_anyway_counts_for_that_rule() -> None:
    items = daily_items("2026-03-01T00:00:00Z", 10)
    assert kept(items, keep=2, protect=["2026-03-10T00:00:00Z"]) == ["2026-03-09T00:00:00Z", "2026-03-10T00:00:00Z"]
    # a protected id that is not an item changes nothing
    assert kept(items, keep=2, protect=["elsewhere"]) == ["2026-03-09T00:00:00Z", "2026-03-10T00:00:00Z"]


def test_no_items() -> None:
    assert select_keep([], PeriodRules(keep=3), now=NOW) == ([], [])


def test_no_rule_at_all_keeps_everything() -> None:
    items = daily_items("2026-03-01T00:00:00Z", 4)
    assert kept(items) == sorted(item_id for item_id, dummy in items)


def test_period_rules_from_params() -> None:
    assert PeriodRules.from_params(None) is None
    assert PeriodRules.from_params({}) is None
    rules = PeriodRules.from_params(
        {"keep": 3, "keep_daily": "7", "keep_weekly": 4, "keep_monthly": 0, "max_age": "90d"}
    )
    assert rules == PeriodRules(keep=3, keep_daily=7, keep_weekly=4, keep_monthly=0, max_age=90 * DAY)
    assert PeriodRules.from_params({"keep": None, "keep_weekly": 2, "max_age": None}) == PeriodRules(keep_weekly=2)
    assert PeriodRules.from_params({"max_age": 3600}) == PeriodRules(max_age=3600)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"keep": -1}, "retention.keep must be 0 or more, not -1."),
        ({"keep_daily": "-3"}, "retention.keep_daily must be 0 or more, not -3."),
        ({"keep_weekly": True}, "retention.keep_weekly must be a whole number (0 or more), not True."),
        ({"keep_monthly": False}, "retention.keep_monthly must be a whole number (0 or more), not False."),
        ({"keep": "seven"}, "retention.keep must be a whole number (0 or more), not 'seven'."),
        ({"keep_daily": "7d"}, "retention.keep_daily must be a whole number (0 or more), not '7d'."),
        ({"keep": 1.5}, "retention.keep must be a whole number (0 or more), not 1.5."),
        ({"keep": [3]}, "retention.keep must be a whole number (0 or more), not [3]."),
        ({"max_age": "7 days"}, "Invalid duration '7 days'"),
        ({"max_age": 0}, "Duration 0 must be greater than zero."),
        ({"max_age": True}, "Invalid duration True."),
        ({"keep_dialy": 7}, "retention has unknown rule(s) keep_dialy; known rules: keep, keep_daily"),
        ({"keep": None, "max_age": None}, "retention needs 'keep', 'max_age' or both, or at least one of"),
        ("keep=3", "retention must be a dict of rules"),
    ],
)
def test_period_rules_refuse_bad_params(params, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        PeriodRules.from_params(params)
    assert message in caught.value.msg


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([("a", 1.0), ("a", 2.0)], "Item 'a' appears more than once; retention needs unique ids."),
        ([("a", "yesterday")], "Item 'a' has no valid time: 'yesterday' is not a number of seconds."),
        ([("a", True)], "Item 'a' has no valid time: True"),
        ([("a", float("nan"))], "Item 'a' has no valid time: nan"),
        ([("a", 1e20)], "Item 'a' has no valid time: 1e+20 is out of range."),
        ([("", 1.0)], "A retention item's id must be a non-empty string, not ''."),
        ([("a", 1.0, "x")], "A retention item must be a pair (id, epoch)"),
    ],
)
def test_select_keep_refuses_bad_items(items, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        select_keep(items, PeriodRules(keep=1), now=NOW)
    assert message in caught.value.msg


# --- qcow2_snapshot's policy with period rules --------------------------------------------------------------------


def test_policy_from_params_with_period_rules() -> None:
    policy = RetentionPolicy.from_params(
        {"match": "auto-*", "keep": None, "keep_daily": 7, "keep_weekly": 4, "keep_monthly": None, "max_age": None}
    )
    assert policy == RetentionPolicy(match="auto-*", keep_daily=7, keep_weekly=4)
    assert policy.rules == PeriodRules(keep_daily=7, keep_weekly=4)


def test_policy_refuses_bad_period_rules() -> None:
    with pytest.raises(ValidationError, match="retention.keep_weekly must be 0 or more, not -2"):
        RetentionPolicy.from_params({"match": "auto-*", "keep_weekly": -2})


def test_policy_period_rules_only_touch_matching_names() -> None:
    # auto-N is N days old; two auto snapshots a day ago (hourly), a manual one that is very old.
    snaps = [snap(index, f"auto-{index}", index) for index in range(1, 15)]
    snaps += [snap(20, "auto-1b", 1.01), snap(21, "manual", 100)]
    now = NOW
    deleted = names(RetentionPolicy(match="auto-*", keep_daily=3).select(snaps, now=now))
    # 1, 2, 3 days old are the three newest days; auto-1b is the older of its day
    assert sorted(deleted) == sorted(["auto-1b"] + [f"auto-{index}" for index in range(4, 15)])
    assert "manual" not in deleted


def test_policy_never_deletes_the_newest_match_unless_every_count_is_zero() -> None:
    old = [snap(1, "auto-a", 30), snap(2, "auto-b", 20), snap(3, "manual", 1)]
    assert names(RetentionPolicy(match="auto-*", max_age=7 * DAY).select(old, now=NOW)) == ["auto-a"]
    assert names(RetentionPolicy(match="auto-*", keep=0, keep_daily=1).select(old, now=NOW)) == ["auto-a"]
    # every count rule given is 0: an explicit request to delete every match (keep: 0 always meant that)
    assert names(RetentionPolicy(match="auto-*", keep=0).select(old, now=NOW)) == ["auto-a", "auto-b"]
    assert names(RetentionPolicy(match="auto-*", keep_daily=0, keep_monthly=0).select(old, now=NOW)) == [
        "auto-a",
        "auto-b",
    ]
    # the snapshot this task creates is the newest match: the older ones may all go
    assert names(RetentionPolicy(match="auto-*", max_age=7 * DAY).select(old, now=NOW, protect="auto-new")) == [
        "auto-a",
        "auto-b",
    ]


def test_policy_new_snapshot_takes_todays_period() -> None:
    snaps = [snap(1, "auto-a", 0.2), snap(2, "auto-b", 1.2), snap(3, "auto-c", 2.2)]
    now = at("2026-03-10T12:00:00Z")
    snaps = [
        Snapshot(id=s.id, name=s.name, vm_state_size=0, date_epoch=now - (NOW - s.date_epoch), vm_clock=0.0)
        for s in snaps
    ]
    # auto-new (now) is today's; auto-a is from today too and goes; yesterday's auto-b is kept
    deleted = RetentionPolicy(match="auto-*", keep_daily=2).select(snaps, now=now, protect="auto-new")
    assert names(deleted) == ["auto-c", "auto-a"]


def test_policy_existing_protected_snapshot_keeps_its_date() -> None:
    # The task keeps 'auto-x' (old) present: it stays, and the newest match is not pruned for it.
    snaps = [snap(1, "auto-x", 5), snap(2, "auto-y", 1)]
    assert names(RetentionPolicy(match="auto-*", keep=1).select(snaps, now=NOW, protect="auto-x")) == []


# --- property: a seeded random loop (hypothesis is not installed) -------------------------------------------------


def test_select_keep_properties_over_random_sets() -> None:
    rng = random.Random(20261201)
    start = at("2025-06-01T00:00:00Z")
    for dummy in range(400):
        count = rng.randint(0, 40)
        items = [(f"b{index}", start + rng.uniform(0, 400 * DAY)) for index in range(count)]
        if items and rng.random() < 0.3:
            items.append(("twin", items[0][1]))  # same second as another item
        rules = PeriodRules(
            **{key: rng.choice([None, 0, 1, 2, 5]) for key in ("keep", "keep_daily", "keep_weekly", "keep_monthly")},
            max_age=rng.choice([None, DAY, 30 * DAY, 365 * DAY]),
        )
        protect = {item_id for item_id, dummy in items if rng.random() < 0.1}
        now = start + 400 * DAY
        keep, remove = select_keep(items, rules, now, protect=protect)
        ids = [item_id for item_id, dummy in items]
        assert sorted(keep + remove) == sorted(ids)
        assert not set(keep) & set(remove)
        assert protect <= set(keep)
        if items:
            # the newest is kept (with a tie in its second, one of the tied items is the newest)
            assert dict(items)[keep[0]] == max(epoch for dummy, epoch in items)
        # deterministic and independent of input order
        assert select_keep(list(reversed(items)), rules, now, protect=protect) == (keep, remove)
        # no count rule kept more periods than it asked for (protected and newest aside)
        extra = set(keep) - protect - ({keep[0]} if keep else set())
        limit = sum(getattr(rules, key) or 0 for key in ("keep", "keep_daily", "keep_weekly", "keep_monthly"))
        if any(getattr(rules, key) is not None for key in ("keep", "keep_daily", "keep_weekly", "keep_monthly")):
            assert len(extra) <= limit
