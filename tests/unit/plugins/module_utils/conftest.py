# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import json
import pathlib
import typing as t

import pytest

from ansible_collections.vmsnap.qemu.tests.unit.plugins.module_utils.qmp_fakes import (
    FakeQmp,
    Handler,
    Recording,
    load_recording,
)

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


@pytest.fixture
def serve(tmp_path: pathlib.Path) -> t.Iterator[t.Callable[..., FakeQmp]]:
    """serve(handler, greet=True): a fake QMP server on a real Unix socket in tmp_path; closed afterwards."""
    servers: list[FakeQmp] = []

    def start(handler: Handler, greet: bool = True) -> FakeQmp:
        server = FakeQmp(str(tmp_path / f"qmp{len(servers)}.sock"), handler, greet)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def live(recorded: Recorded) -> t.Callable[..., Recording]:
    """live(name, root="/vms"): the recording fixtures/qemu-7.2.22/live-<name>.json, its paths moved to root."""

    def load(name: str, root: t.Any = "/vms") -> Recording:
        return load_recording(recorded.json(f"live-{name}.json"), root)

    return load
