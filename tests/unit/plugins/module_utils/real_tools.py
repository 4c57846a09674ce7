# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The real qemu-img for unit tests that run the runner against real files."""

from __future__ import annotations

import shutil
import typing as t

from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg


class BinModule:
    """What QemuImg needs of an AnsibleModule: the real qemu-img (a missing one fails the test, never skips it)."""

    def get_bin_path(self, name: str, required: bool = False) -> str:
        found = shutil.which(name)
        assert found, f"{name} is not installed"
        return found


def real_qemu_img() -> QemuImg:
    return QemuImg(t.cast(t.Any, BinModule()))
