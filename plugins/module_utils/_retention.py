# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Retention: which snapshots or backups to keep. Pure logic, no I/O.

`select_keep()` applies Proxmox Backup Server's prune rules (keep-last, then daily, weekly and monthly periods,
each rule counting only its own periods) plus a maximum age. `RetentionPolicy` is qcow2_snapshot's policy: a name
glob over internal snapshots, on top of the same rules.
"""

from __future__ import annotations

import datetime
import fnmatch
import math
import re
import typing as t
from dataclasses import dataclass

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError

if t.TYPE_CHECKING:
    from ansible_collections.vmsnap.qemu.plugins.module_utils._image import Snapshot

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_SIGNED = re.compile(r"^\s*-?\d+\s*$")

COUNT_RULES = ("keep", "keep_daily", "keep_weekly", "keep_monthly")
RULE_NAMES = COUNT_RULES + ("max_age",)


def parse_duration(value: t.Any) -> int:
    """'90' or '90s', '15m', '12h', '7d', '2w' -> seconds."""
    if isinstance(value, bool):
        raise ValidationError(f"Invalid duration {value!r}.")
    if isinstance(value, int):
        seconds = value
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValidationError(
                f"Invalid duration {value!r}: use a whole number with an optional unit s, m, h, d or w (e.g. '7d')."
            )
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
    if seconds <= 0:
        raise ValidationError(f"Duration {value!r} must be greater than zero.")
    return seconds


def _parse_count(key: str, value: t.Any) -> int:
    """A count rule: a whole number >= 0 (a string of digits, as Ansible passes templated values, is accepted)."""
    if isinstance(value, str) and _SIGNED.match(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"retention.{key} must be a whole number (0 or more), not {value!r}.")
    if value < 0:
        raise ValidationError(f"retention.{key} must be 0 or more, not {value}.")
    return value


@dataclass(frozen=True)
class PeriodRules:
    """Retention rules. Counts are numbers of periods (keep: of items); max_age is in seconds."""

    keep: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    max_age: int | None = None

    @classmethod
    def from_params(cls, params: t.Mapping[str, t.Any] | None) -> PeriodRules | None:
        """Validated rules from an option dict (missing or None values are rules not given); None for no dict."""
        if not params:
            return None
        if not isinstance(params, t.Mapping):
            raise ValidationError(f"retention must be a dict of rules ({', '.join(RULE_NAMES)}), not {params!r}.")
        unknown = sorted(str(key) for key in params if key not in RULE_NAMES)
        if unknown:
            raise ValidationError(
                f"retention has unknown rule(s) {', '.join(unknown)}; known rules: {', '.join(RULE_NAMES)}."
            )
        counts = {key: _parse_count(key, params[key]) for key in COUNT_RULES if params.get(key) is not None}
        max_age = params.get("max_age")
        if not counts and max_age is None:
            raise ValidationError(
                "retention needs 'keep', 'max_age' or both, or at least one of 'keep_daily', 'keep_weekly', "
                "'keep_monthly'."
            )
        return cls(max_age=None if max_age is None else parse_duration(max_age), **counts)

    @property
    def has_count_rule(self) -> bool:
        return any(getattr(self, key) is not None for key in COUNT_RULES)

    @property
    def keeps_nothing(self) -> bool:
        """Every count rule given is 0: an explicit request to keep no item at all."""
        return self.has_count_rule and not any(getattr(self, key) for key in COUNT_RULES)

    def as_dict(self) -> dict[str, int | None]:
        return {key: getattr(self, key) for key in RULE_NAMES}


def _natural_key(item_id: str) -> list[t.Any]:
    """'9' < '10', 'x' < 'x-2': the tie-break between items of the same second (the greater id counts as newer)."""
    parts: list[t.Any] = re.split(r"(\d+)", item_id)
    parts[1::2] = [int(part) for part in parts[1::2]]
    return parts


def _utc(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc)


def _day(epoch: float) -> tuple[int, ...]:
    moment = _utc(epoch)
    return (moment.year, moment.month, moment.day)


def _iso_week(epoch: float) -> tuple[int, ...]:
    # ISO year and week: 2020-12-31 is in week 53 of 2020, 2021-01-03 too; 2024-12-30 is week 1 of 2025.
    iso = _utc(epoch).isocalendar()
    return (iso[0], iso[1])


def _month(epoch: float) -> tuple[int, ...]:
    moment = _utc(epoch)
    return (moment.year, moment.month)


_PERIODS: tuple[tuple[str, t.Callable[[float], tuple[int, ...]]], ...] = (
    ("keep_daily", _day),
    ("keep_weekly", _iso_week),
    ("keep_monthly", _month),
)


def _check_items(items: t.Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    checked: list[tuple[str, float]] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValidationError(f"A retention item must be a pair (id, epoch), not {item!r}.")
        item_id, epoch = item
        if not isinstance(item_id, str) or not item_id:
            raise ValidationError(f"A retention item's id must be a non-empty string, not {item_id!r}.")
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not math.isfinite(epoch):
            raise ValidationError(f"Item '{item_id}' has no valid time: {epoch!r} is not a number of seconds.")
        try:
            _utc(epoch)
        except (OverflowError, ValueError, OSError):
            raise ValidationError(f"Item '{item_id}' has no valid time: {epoch!r} is out of range.") from None
        if item_id in seen:
            raise ValidationError(f"Item '{item_id}' appears more than once; retention needs unique ids.")
        seen.add(item_id)
        checked.append((item_id, float(epoch)))
    return checked


def _mark(
    newest_first: list[tuple[str, float]],
    marks: dict[str, bool],
    count: int,
    period_of: t.Callable[[tuple[str, float]], t.Hashable],
) -> None:
    """One rule, as Proxmox Backup Server's mark_selections(): marks[id] = True (keep) or False (remove)."""
    covered = {period_of(item) for item in newest_first if marks.get(item[0]) is True}
    counted: set[t.Hashable] = set()
    for item in newest_first:
        if item[0] in marks:
            continue
        period = period_of(item)
        if period in covered:
            continue
        if period in counted:
            marks[item[0]] = False  # an older item of a period this rule already keeps
            continue
        if len(counted) >= count:
            break
        counted.add(period)
        marks[item[0]] = True


def select_keep(
    items: t.Sequence[tuple[str, float]],
    rules: PeriodRules,
    now: float,
    protect: t.Collection[str] = (),
    keep_newest: bool = True,
) -> tuple[list[str], list[str]]:
    """(kept ids, removed ids), each newest first. items = (id, epoch seconds); ids must be unique.

    Proxmox Backup Server semantics: the rules keep, keep_daily, keep_weekly (ISO weeks), keep_monthly, in that
    order, each walk the items newest first, skip periods that hold an item an earlier rule kept, and keep the newest
    item of each new period until they have their number of periods. Periods are UTC. An item no rule keeps goes.
    Without any count rule every item is kept by the rules. Then max_age removes items older than it (even if a rule
    kept them). The newest item and every id in `protect` are always kept; where a rule keeps one of them anyway, it
    counts for that rule. Items of the same second: the one with the greater id (natural order) counts as newer.
    keep_newest=False lets the rules remove the newest item too (qcow2_snapshot's explicit 'keep: 0').
    """
    checked = _check_items(items)
    newest_first = sorted(checked, key=lambda item: (item[1], _natural_key(item[0])), reverse=True)
    if rules.has_count_rule:
        marks: dict[str, bool] = {}
        if rules.keep is not None:
            _mark(newest_first, marks, rules.keep, lambda item: item[0])
        for key, period in _PERIODS:
            count = getattr(rules, key)
            if count is not None:
                _mark(newest_first, marks, count, lambda item, period=period: period(item[1]))
        kept_by_rules = {item_id for item_id, keep in marks.items() if keep}
    else:
        kept_by_rules = {item_id for item_id, dummy in newest_first}
    if rules.max_age is not None:
        young = {item_id for item_id, epoch in newest_first if now - epoch <= rules.max_age}
        kept_by_rules &= young
    always = set(protect)
    if newest_first and keep_newest:
        always.add(newest_first[0][0])
    kept = [item_id for item_id, dummy in newest_first if item_id in kept_by_rules or item_id in always]
    removed = [item_id for item_id, dummy in newest_first if item_id not in kept_by_rules and item_id not in always]
    return kept, removed


@dataclass(frozen=True)
class RetentionPolicy:
    """qcow2_snapshot's retention: only snapshots whose names match `match` are ever candidates."""

    match: str
    keep: int | None = None
    max_age: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, t.Any] | None) -> RetentionPolicy | None:
        if not params:
            return None
        match = params.get("match")
        if not match:
            raise ValidationError(
                "retention needs 'match' (a glob such as 'auto-*'): retention only ever deletes snapshots "
                "whose names match it, so it must be given explicitly."
            )
        rules = PeriodRules.from_params({key: value for key, value in params.items() if key != "match"})
        # A dict holding only 'match' fails in PeriodRules.from_params, so rules is never None here.
        return cls(match=match, **t.cast(PeriodRules, rules).as_dict())

    @property
    def rules(self) -> PeriodRules:
        return PeriodRules(
            keep=self.keep,
            keep_daily=self.keep_daily,
            keep_weekly=self.keep_weekly,
            keep_monthly=self.keep_monthly,
            max_age=self.max_age,
        )

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.match)

    def select(self, snapshots: t.Iterable[Snapshot], now: float, protect: str | None = None) -> list[Snapshot]:
        """Snapshots to delete, oldest first.

        Only names matching 'match' are candidates. 'protect' (the snapshot the task keeps present) never goes and,
        when it does not exist yet, is counted as the newest snapshot, taken now. The newest matching snapshot never
        goes either, unless every count rule given is 0 (an explicit 'keep: 0' deletes every match, as it always did).
        """
        candidates = [snap for snap in snapshots if self.matches(snap.name)]
        items = [(snap.id, snap.date_epoch) for snap in candidates]
        protected = [snap.id for snap in candidates if protect is not None and snap.name == protect]
        if protect is not None and self.matches(protect) and not protected:
            # A snapshot id is QEMU's number, so this key cannot collide with one.
            items.append(("new:" + protect, max([now] + [epoch for dummy, epoch in items])))
            protected.append("new:" + protect)
        rules = self.rules
        dummy, removed = select_keep(items, rules, now, protect=protected, keep_newest=not rules.keeps_nothing)
        gone = set(removed)
        return sorted((snap for snap in candidates if snap.id in gone), key=_age_key)


def _age_key(snap: Snapshot) -> tuple[float, list[t.Any]]:
    return (snap.date_epoch, _natural_key(snap.id))
