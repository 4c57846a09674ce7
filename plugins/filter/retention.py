# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""retention_select: which items (snapshots, backups) a set of retention rules keeps and which it removes."""

from __future__ import annotations

import time
import typing as t

from ansible.errors import AnsibleFilterError

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._retention import PeriodRules, select_keep


def _item(entry: t.Any, index: int) -> tuple[str, t.Any]:
    if not isinstance(entry, t.Mapping):
        raise AnsibleFilterError(
            f"retention_select: item {index} must be a dict with 'name' and 'epoch', not {entry!r}."
        )
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise AnsibleFilterError(f"retention_select: item {index} has no 'name' (a non-empty string): {entry!r}.")
    epoch = entry.get("epoch", entry.get("date_epoch"))
    if epoch is None:
        raise AnsibleFilterError(
            f"retention_select: item '{name}' has no 'epoch' (or 'date_epoch'): its time in seconds since the epoch."
        )
    return name, epoch


def _protected(protect: t.Any) -> list[str]:
    if protect is None:
        return []
    if isinstance(protect, str):
        return [protect]
    if isinstance(protect, (list, tuple, set, frozenset)) and all(isinstance(name, str) for name in protect):
        return list(protect)
    raise AnsibleFilterError(f"retention_select: protect must be a list of names, not {protect!r}.")


def retention_select(items: t.Any, rules: t.Any, now: t.Any = None, protect: t.Any = None) -> dict[str, list[str]]:
    if isinstance(items, (str, bytes, t.Mapping)) or not isinstance(items, t.Iterable):
        raise AnsibleFilterError(f"retention_select expects a list of {{name, epoch}} dicts, not {items!r}.")
    if isinstance(now, bool) or now is not None and not isinstance(now, (int, float)):
        raise AnsibleFilterError(f"retention_select: now must be seconds since the epoch, not {now!r}.")
    pairs = [_item(entry, index) for index, entry in enumerate(items)]
    try:
        parsed = PeriodRules.from_params(rules) if rules else None
        keep, remove = select_keep(
            pairs,
            parsed if parsed is not None else PeriodRules(),
            time.time() if now is None else float(now),
            protect=_protected(protect),
        )
    except VmsnapError as exc:
        raise AnsibleFilterError(f"retention_select: {exc.msg}") from exc
    return {"keep": keep, "remove": remove}


class FilterModule:
    def filters(self) -> dict[str, t.Callable[..., t.Any]]:
        return {"retention_select": retention_select}
