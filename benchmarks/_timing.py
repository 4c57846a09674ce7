# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Shared by the benchmarks: run tasks as one local play and return each task's wall time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed_play(tasks: list[dict], work: Path, name: str) -> list[dict]:
    """Run tasks on localhost with the task_timer callback; rows of {task, seconds, ok}. Raises if one failed."""
    book = work / f"{name}.yml"
    play = {
        "name": name,
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "vars": {"ansible_python_interpreter": sys.executable},
        "tasks": tasks,
    }
    book.write_text(json.dumps([play]))
    timings = work / f"{name}.timings.jsonl"
    env = dict(
        os.environ,
        ANSIBLE_CALLBACK_PLUGINS=str(HERE / "callback_plugins"),
        ANSIBLE_CALLBACKS_ENABLED="task_timer",
        VMSNAP_BENCH_TIMINGS=str(timings),
    )
    playbook = Path(sys.executable).parent / "ansible-playbook"
    subprocess.run([str(playbook), "-i", "localhost,", str(book)], check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in timings.read_text().splitlines()]
    failed = [row["task"] for row in rows if not row["ok"]]
    if failed:
        raise RuntimeError(f"benchmark tasks failed: {failed}")
    return rows
