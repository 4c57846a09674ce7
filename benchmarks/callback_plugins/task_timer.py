# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Benchmark helper: records each task's wall time (task start to its result) as JSON lines."""

from __future__ import annotations

DOCUMENTATION = r"""
name: task_timer
type: aggregate
short_description: Write per-task wall times to the file named by VMSNAP_BENCH_TIMINGS
description:
  - Used only by the benchmarks in C(benchmarks/); not part of the collection.
requirements:
  - enable in the benchmark's environment
"""

import json
import os
import time

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "task_timer"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._started: dict[str, float] = {}
        self._out = os.environ.get("VMSNAP_BENCH_TIMINGS")

    def v2_playbook_on_task_start(self, task, is_conditional) -> None:
        self._started[task._uuid] = time.perf_counter()

    def _record(self, result, ok: bool) -> None:
        task = result._task
        started = self._started.pop(task._uuid, None)
        if started is None or not self._out:
            return
        with open(self._out, "a") as handle:
            handle.write(
                json.dumps({"task": task.get_name(), "seconds": time.perf_counter() - started, "ok": ok}) + "\n"
            )

    def v2_runner_on_ok(self, result) -> None:
        self._record(result, True)

    def v2_runner_on_failed(self, result, ignore_errors=False) -> None:
        self._record(result, False)
