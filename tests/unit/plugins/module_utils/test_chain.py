# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Pure helpers of the chain core; planning and execution are covered by the qcow2_chain integration target."""

from __future__ import annotations

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._chain import flatten_temp_path, validate_size
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError


@pytest.mark.parametrize("size", [None, "20G", "512M", "1073741824", "1T"])
def test_good_sizes(size) -> None:
    assert validate_size(size) == size


@pytest.mark.parametrize("size", ["", "20 G", "-1G", "1.5G", "20GB", "size", "20G;rm"])
def test_bad_sizes(size: str) -> None:
    with pytest.raises(ValidationError, match="is not a qemu-img size"):
        validate_size(size)


def test_flatten_temp_file_is_a_hidden_sibling_with_a_fixed_name() -> None:
    assert flatten_temp_path("/var/lib/vms/web02.qcow2") == "/var/lib/vms/.web02.qcow2.vmsnap-flatten.tmp"
