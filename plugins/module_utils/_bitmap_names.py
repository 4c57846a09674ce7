# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Names of the dirty bitmaps that qcow2_backup keeps on a disk: vmsnap-backup-<set>-<chain>.

Every module recognises the collection's own bitmaps by this pattern alone; a bitmap whose name does not match
belongs to another tool and is never touched.
"""

from __future__ import annotations

import re
import typing as t

BITMAP_PREFIX = "vmsnap-backup-"
_NAME = re.compile(r"^vmsnap-backup-(?P<set>[A-Za-z0-9._-]+)-(?P<chain>[0-9a-f]{8})$")
_SET = re.compile(r"^[A-Za-z0-9._-]+$")


def bitmap_name(set_name: str, chain: str) -> str:
    if not _SET.match(set_name) or not re.match(r"^[0-9a-f]{8}$", chain):
        raise ValueError(f"not a valid backup set name and chain id: {set_name!r}, {chain!r}")
    return f"{BITMAP_PREFIX}{set_name}-{chain}"


def parse_bitmap_name(name: t.Any) -> tuple[str, str] | None:
    """(set, chain) for one of the collection's backup bitmaps, None for any other name."""
    match = _NAME.match(name) if isinstance(name, str) else None
    return (match.group("set"), match.group("chain")) if match else None
