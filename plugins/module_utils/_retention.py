# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Retention policy for internal snapshots: pure logic, no I/O."""

from __future__ import annotations

import fnmatch
import re
import typing as t
from dataclasses import dataclass

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError

if t.TYPE_CHECKING:
    from ansible_collections.vmsnap.qemu.plugins.module_utils._image import Snapshot

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")


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


@dataclass(frozen=True)
class RetentionPolicy:
    match: str
    keep: int | None = None
    max_age: int | None = None

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
        keep = params.get("keep")
        max_age = params.get("max_age")
        if keep is None and max_age is None:
            raise ValidationError("retention needs 'keep', 'max_age' or both.")
        if keep is not None and keep < 0:
            raise ValidationError(f"retention.keep must be 0 or more, not {keep}.")
        return cls(match=match, keep=keep, max_age=None if max_age is None else parse_duration(max_age))

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.match)

    def select(self, snapshots: t.Iterable[Snapshot], now: float, protect: str | None = None) -> list[Snapshot]:
        """Snapshots to delete, oldest first.

        Only names matching 'match' are candidates; 'protect' (the snapshot a task has just made) never is.
        A candidate goes when it is not among the 'keep' newest candidates, or is older than 'max_age'.
        """
        candidates = [snap for snap in snapshots if self.matches(snap.name) and snap.name != protect]
        newest_first = sorted(candidates, key=_age_key, reverse=True)
        keep_slots = None if self.keep is None else max(self.keep - (1 if protect and self.matches(protect) else 0), 0)
        doomed = []
        for index, snap in enumerate(newest_first):
            beyond_keep = keep_slots is not None and index >= keep_slots
            too_old = self.max_age is not None and now - snap.date_epoch > self.max_age
            if beyond_keep or too_old:
                doomed.append(snap)
        return sorted(doomed, key=_age_key)


def _age_key(snap: Snapshot) -> tuple[float, int]:
    return (snap.date_epoch, int(snap.id) if snap.id.isdigit() else 0)
