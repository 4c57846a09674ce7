# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import json
import pathlib
import typing as t

import pytest

# Outputs recorded from real qemu-img runs; the folder name is the QEMU version that printed them.
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "qemu-7.2.22"


class Recorded:
    def json(self, name: str) -> t.Any:
        return json.loads((FIXTURES / name).read_text())

    def text(self, name: str) -> str:
        return (FIXTURES / name).read_text()


@pytest.fixture
def recorded() -> Recorded:
    return Recorded()
