# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""A stand-in for systemctl (start, stop, is-active), because systemd does not run on the test machine.

Real systemd was NOT available where these tests were written (PID 1 is not systemd), so qemu_vm's unit path is
tested against this script. It reads a unit described as JSON in $FAKE_SYSTEMD_DIR/<unit>.json:
{"exec_start": [argv words, "$VMSNAP_QEMU_ARGS"], "environment_file": "-/path/%n.env", "stop_noop": false},
loads the environment file with systemd's EnvironmentFile= rules (systemd's env-file.c), expands an unquoted $VAR
word of ExecStart= by splitting it like systemd does (extract_first_word with EXTRACT_UNQUOTE|EXTRACT_RELAX), and
runs QEMU in the foreground in its own session (like Type=simple). Every call is logged to calls.jsonl with the
environment file's text at that moment.

The parsing functions are imported by the unit tests of the quoting, too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

WHITESPACE = " \t\n\r"
_SHELL_NEED_ESCAPE = '"\\`$'
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def parse_env_file(text: str) -> dict[str, str]:  # noqa: C901, PLR0912 - one state machine, as in systemd
    """KEY=VALUE assignments as systemd's EnvironmentFile= reads them (unquoted, '...' and "..." values)."""
    env: dict[str, str] = {}
    state, key, value = "pre_key", "", ""
    for c in text + "\n":
        if state == "pre_key":
            if c in "#;":
                state = "comment"
            elif c not in WHITESPACE:
                state, key = "key", c
        elif state == "key":
            if c == "\n":
                state = "pre_key"  # a line without "=" is ignored
            elif c == "=":
                state, value = "pre_value", ""
            else:
                key += c
        elif state == "pre_value":
            if c == "\n":
                env[key.strip()] = value
                state = "pre_key"
            elif c in " \t\r":
                pass
            elif c == "'":
                state = "single"
            elif c == '"':
                state = "double"
            elif c == "\\":
                state = "value_escape"
            else:
                state, value = "value", value + c
        elif state == "value":
            if c == "\n":
                env[key.strip()] = value.rstrip(" \t\r")
                state = "pre_key"
            elif c == "\\":
                state = "value_escape"
            else:
                value += c
        elif state == "value_escape":
            state = "value"
            if c != "\n":
                value += c
        elif state == "single":
            if c == "'":
                state = "pre_value"
            else:
                value += c
        elif state == "double":
            if c == '"':
                state = "pre_value"
            elif c == "\\":
                state = "double_escape"
            else:
                value += c
        elif state == "double_escape":
            state = "double"
            if c != "\n":
                value += c if c in _SHELL_NEED_ESCAPE else "\\" + c
        elif state == "comment":
            if c == "\\":
                state = "comment_escape"
            elif c == "\n":
                state = "pre_key"
        elif state == "comment_escape":
            state = "comment"
    return env


def split_words(value: str) -> list[str]:
    """systemd's split of an unquoted $VAR word: whitespace separates, quotes are removed, a backslash takes the
    next character literally (also inside quotes), unbalanced quotes end the word (RELAX)."""
    words: list[str] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i] in WHITESPACE:
            i += 1
        if i >= n:
            return words
        word: list[str] = []
        quote = ""
        while i < n:
            c = value[i]
            i += 1
            if c == "\\":
                if i < n:
                    word.append(value[i])
                    i += 1
            elif quote:
                if c == quote:
                    quote = ""
                else:
                    word.append(c)
            elif c in "'\"":
                quote = c
            elif c in WHITESPACE:
                break
            else:
                word.append(c)
        words.append("".join(word))


def expand_exec_start(words: list[str], env: dict[str, str]) -> list[str]:
    argv: list[str] = []
    for word in words:
        name = word[1:]
        if word.startswith("$") and _VAR_NAME.match(name):
            argv.extend(split_words(env[name]) if name in env else [])
        else:
            argv.append(word)
    return argv


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            return stat_file.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True


def main(argv: list[str]) -> int:
    command, unit = argv[1], argv[2]
    folder = Path(os.environ["FAKE_SYSTEMD_DIR"])
    spec = json.loads((folder / f"{unit}.json").read_text())
    env_file = spec["environment_file"].lstrip("-").replace("%n", unit)
    env_text = Path(env_file).read_text() if os.path.exists(env_file) else None
    with open(folder / "calls.jsonl", "a") as calls:
        calls.write(json.dumps({"command": command, "unit": unit, "env_file_text": env_text}) + "\n")
    pid_file = folder / f"{unit}.pid"
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    if command == "start":
        if pid is not None and not _gone(pid):
            return 0
        if env_text is None and not spec["environment_file"].startswith("-"):
            print(f"Failed to load environment file {env_file}", file=sys.stderr)
            return 1
        qemu_argv = expand_exec_start(spec["exec_start"], parse_env_file(env_text or ""))
        with open(folder / f"{unit}.argv.json", "w") as argv_file:
            json.dump(qemu_argv, argv_file)
        with open(folder / f"{unit}.log", "ab") as log:
            proc = subprocess.Popen(qemu_argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        pid_file.write_text(str(proc.pid))
        return 0
    if command == "stop":
        if spec.get("stop_noop") or pid is None:
            return 0
        if not _gone(pid):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid_file.unlink()
        return 0
    if command == "is-active":
        state = "inactive" if pid is None else ("failed" if _gone(pid) else "active")
        print(state)
        return 0 if state == "active" else 3
    print(f"fake systemctl: unknown command {command}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
