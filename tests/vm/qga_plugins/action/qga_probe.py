# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""A test-only action for test_qga_connection.py: calls the connection plugin's own methods, nothing around them.

op=exec: exec_command(cmd, in_data) with its exit code, stdout and stderr returned as base64 (byte for byte, which the
raw action's text results cannot show); op=put / op=fetch: put_file / fetch_file of src to dest.
"""

from __future__ import annotations

import base64
import time
import typing as t

from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    def run(self, tmp: t.Any = None, task_vars: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
        result = super().run(tmp, task_vars)
        args = self._task.args
        started = time.monotonic()
        if args["op"] == "exec":
            stdin = args.get("stdin_b64")
            in_data = None if stdin is None else base64.b64decode(stdin)
            rc, stdout, stderr = self._connection.exec_command(args["cmd"], in_data=in_data, sudoable=False)
            result.update(
                exit_code=rc,  # not "rc": Ansible fails a task whose rc is not 0
                stdout_b64=base64.b64encode(stdout).decode("ascii"),
                stderr_b64=base64.b64encode(stderr).decode("ascii"),
            )
        elif args["op"] == "put":
            self._connection.put_file(args["src"], args["dest"])
        elif args["op"] == "fetch":
            self._connection.fetch_file(args["src"], args["dest"])
        else:
            result.update(failed=True, msg=f"unknown op {args['op']}")
        result["seconds"] = time.monotonic() - started
        result["changed"] = False
        return result
