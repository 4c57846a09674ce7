# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""report_lines: one readable line per guest of a vmsnap.qemu.pre_upgrade report."""

from __future__ import annotations

import typing as t

from ansible.errors import AnsibleFilterError


def _checkpoint_words(guest: dict[str, t.Any]) -> str:
    if not guest.get("checkpointed"):
        return "not checkpointed"
    method = guest.get("method") or "?"
    pause = guest.get("pause_ms")
    if pause in (None, "", "None"):
        return f"checkpointed ({method})"
    return f"checkpointed ({method}, pause {float(pause):.0f} ms)"


def guest_line(name: str, guest: dict[str, t.Any]) -> str:
    outcome = guest.get("outcome", "?")
    if outcome == "skipped":
        return f"{name}: skipped - {guest.get('detail', 'not reached')}"
    words = [_checkpoint_words(guest)]
    if guest.get("upgraded"):
        words.append("upgraded")
    if guest.get("healthy"):
        words.append("healthy")
    if outcome in ("failed", "rolled back"):
        words.append(f"FAILED at '{guest.get('failed_task', '?')}': {guest.get('error', '')}".rstrip(": "))
    if guest.get("rolled_back"):
        seconds = guest.get("rollback_seconds")
        words.append(f"rolled back in {float(seconds):.1f} s" if seconds not in (None, "") else "rolled back")
    words.append("released" if guest.get("released") else "checkpoint kept")
    hypervisor = guest.get("hypervisor")
    where = f" on {hypervisor}" if hypervisor else ""
    return f"{name}{where}: {outcome.upper()} - " + ", ".join(words)


def report_lines(report: t.Any) -> list[str]:
    if not isinstance(report, dict) or not isinstance(report.get("guests"), dict):
        raise AnsibleFilterError("report_lines expects a vmsnap.qemu.pre_upgrade report (a dict with 'guests').")
    return [guest_line(str(name), dict(guest)) for name, guest in sorted(report["guests"].items())]


class FilterModule:
    def filters(self) -> dict[str, t.Callable[..., t.Any]]:
        return {"report_lines": report_lines}
