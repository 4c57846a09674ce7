# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""A qemu-guest-agent client (the host side of the agent's virtio-serial socket) for fs-freeze and thaw.

The agent speaks QMP-style JSON without a greeting. A connection can hold stale bytes from an earlier
client, so every session starts with guest-sync-delimited: the agent answers with a 0xFF byte before
its JSON reply, and everything before that byte is dropped.
"""

from __future__ import annotations

import json
import random
import time
import typing as t

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient, QmpTimeoutError

_SYNC_ATTEMPT_SECONDS = 2.0


class GuestAgentClient(QmpClient):
    kind = "guest agent socket"

    def connect(self) -> None:
        self._open_socket()
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                self._sync(min(deadline, time.monotonic() + _SYNC_ATTEMPT_SECONDS))
                return
            except QmpTimeoutError:
                if time.monotonic() >= deadline:
                    self.close()
                    raise QmpTimeoutError(
                        f"The guest agent at {self.path} did not answer within {self.connect_timeout:g} s. "
                        "Is qemu-guest-agent installed and running in the guest, and is no other client "
                        "connected to that socket (QEMU serves one at a time)?",
                        socket=self.path,
                    ) from None

    def _sync(self, deadline: float) -> None:
        sync_id = random.randint(1, 2**31 - 1)
        request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        # A leading 0xFF makes the agent drop any half-parsed input from an earlier client.
        self._send_raw(b"\xff" + json.dumps(request).encode("utf-8") + b"\n", "guest-sync-delimited")
        while True:
            while b"\xff" not in self._buffer:
                self._buffer = b""
                self._fill(deadline, "the guest agent's sync marker")
            self._buffer = self._buffer[self._buffer.rindex(b"\xff") + 1 :]
            reply = self._read_message(deadline, waiting_for="the guest agent's sync reply")
            if reply.get("return") == sync_id:
                return


class GuestFreezer:
    """fs-freeze and thaw through a connected guest agent."""

    def __init__(self, agent: GuestAgentClient, timeout: float) -> None:
        self.agent = agent
        self.timeout = timeout

    def probe(self) -> None:
        """Fail now, before any snapshot, when the agent cannot freeze or the guest is already frozen."""
        status = self.agent.execute("guest-fsfreeze-status", timeout=self.timeout)
        if status != "thawed":
            if status not in ("frozen", "freezing", "thawing"):
                raise GuestAgentError(
                    f"The guest agent answered guest-fsfreeze-status with {status!r:.200}, not thawed or frozen; "
                    "not freezing a guest whose state is unknown.",
                    guest_fsfreeze_status=status,
                )
            raise GuestAgentError(
                f"The guest's file systems are already {status} (someone else froze them); not freezing again.",
                guest_fsfreeze_status=status,
            )

    def freeze(self) -> int:
        try:
            return fs_count(self.agent.execute("guest-fsfreeze-freeze", timeout=self.timeout), "guest-fsfreeze-freeze")
        except VmsnapError as exc:
            # A freeze that failed half-way can leave some file systems frozen.
            msg = f"The guest agent could not freeze the file systems: {exc.msg}"
            try:
                self.agent.execute("guest-fsfreeze-thaw", timeout=self.timeout)
            except VmsnapError as thaw_exc:
                raise GuestAgentError(
                    f"{msg} Thawing afterwards failed too ({thaw_exc.msg}): the guest may still be frozen; "
                    "run guest-fsfreeze-thaw.",
                    guest_may_be_frozen=True,
                ) from None
            raise GuestAgentError(msg) from None

    def thaw(self) -> int:
        return fs_count(self.agent.execute("guest-fsfreeze-thaw", timeout=self.timeout), "guest-fsfreeze-thaw")


def fs_count(reply: t.Any, command: str) -> int:
    """The number of file systems a freeze or thaw acted on; any other reply leaves the guest's state unknown."""
    if isinstance(reply, bool) or not isinstance(reply, int) or reply < 0:
        raise GuestAgentError(
            f"The guest agent answered {command} with {reply!r:.200} instead of a number of file systems, so "
            "whether the guest's file systems are frozen is unknown",
            agent_reply=reply,
        )
    return reply


class GuestAgentError(VmsnapError):
    """The guest agent answered, but could not do what quiesce needs."""
