# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Test helper for test_qga_connection.py: every task result as one JSON line, with its status."""

from __future__ import annotations

DOCUMENTATION = r"""
name: qga_results
type: aggregate
short_description: Write each task result (ok, failed, unreachable, skipped) as JSON lines to $VMSNAP_QGA_RESULTS
description:
  - Used only by the tests in C(tests/vm/); not part of the collection.
requirements:
  - enable in the test's environment
"""

import json
import os
import typing as t

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "qga_results"
    CALLBACK_NEEDS_ENABLED = True

    def _write(self, status: str, result: t.Any) -> None:
        line = {"task": result.task_name, "host": result._host.get_name(), "status": status, "result": result._result}
        with open(os.environ["VMSNAP_QGA_RESULTS"], "a", encoding="utf-8") as out:
            out.write(json.dumps(line, default=str) + "\n")

    def v2_runner_on_ok(self, result: t.Any) -> None:
        self._write("ok", result)

    def v2_runner_on_failed(self, result: t.Any, ignore_errors: bool = False) -> None:
        self._write("failed", result)

    def v2_runner_on_unreachable(self, result: t.Any) -> None:
        self._write("unreachable", result)

    def v2_runner_on_skipped(self, result: t.Any) -> None:
        self._write("skipped", result)
