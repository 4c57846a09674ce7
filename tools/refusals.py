#!/usr/bin/env python
# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Draft rows for docs/refusals.md (the table itself is checked by hand).

    python tools/refusals.py            rows for the messages that docs/refusals.md lacks, grouped by file
    python tools/refusals.py --all      rows for every message (a fresh draft)
    python tools/refusals.py --check    the unit test's problems, one per line

For each message: where it is raised and under which condition, whether the message itself says that nothing
was changed, and the test whose string literals quote the longest distinctive piece of it (a pytest function, or a
named task of an integration target). A proposed test only quotes the message: whether it also proves that
nothing changed is for the reader to check.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
import re
import sys
import typing as t

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("catalogue", ROOT / "tests" / "unit" / "test_refusal_catalogue.py")
assert _spec and _spec.loader
cat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cat)

UNCHANGED = re.compile(
    r"nothing (was |is )?(changed|touched|written|loaded|saved|deleted|pruned|merged|replaced|done|kept|reverted"
    r"|reported)|(left|was) (untouched|as it was|as it is|alone)|not touched|no snapshot was taken|was not "
    r"(loaded|applied|recorded|touched|deleted|killed|cancelled)|refusing|no job started|nothing else was done",
    re.I,
)
AFTER = re.compile(
    r"was (committed|flattened|created|merged)\b|(were|was) taken, but|is done, but|changed as requested|were "
    r"finalized|already removed|wrote the state, but|was saved, but|started, but|were merged, but|merged into its "
    r"backing file|bitmap may have been cleared|recorded backups|these could not be removed",
    re.I,
)
BEFORE_FILES = (
    "_validate.py",
    "_retention.py",
    "_live.py",
    "_preflight.py",
    "_backup.py",
    "_manifest.py",
    "_revert_bitmaps.py",
    "_image.py",
    "_bitmap_names.py",
    "plugins/modules/",
    "plugins/filter/",
    "roles/",
    "playbooks/",
)


def _strings(node: t.Any) -> t.Iterator[str]:
    if isinstance(node, str):
        yield node
        for single, double in re.findall(r"'([^']{8,})'|\"([^\"]{8,})\"", node):
            yield single or double
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _py_strings(node: ast.AST) -> list[str]:
    out = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            out.append(sub.value)
        elif isinstance(sub, ast.JoinedStr):
            out.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in sub.values))
    return out


def test_index() -> dict[str, list[str]]:
    """Test reference -> the string pieces it quotes."""
    index: dict[str, list[str]] = {}
    for path in sorted(ROOT.glob("tests/**/*.py")):
        if "output" in path.parts or path.name == "test_refusal_catalogue.py":
            continue
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_names = {}
        for node in tree.body:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        module_names[target.id] = node
        tests: list[tuple[str, ast.AST]] = []
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                tests.append((f"{rel}::{node.name}", node))
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                tests.extend(
                    (f"{rel}::{node.name}::{sub.name}", sub)
                    for sub in node.body
                    if isinstance(sub, ast.FunctionDef) and sub.name.startswith("test")
                )
        for ref, node in tests:
            strings = _py_strings(node)
            for name in {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}:
                if name in module_names:
                    strings.extend(_py_strings(module_names[name]))
            index[ref] = [re.sub(r"\\([^\w\s])", r"\1", s) for s in strings]
    for path in sorted(ROOT.glob("tests/integration/targets/*/tasks/*.yml")):
        target = "/".join(path.parts[-4:-2])
        for task in cat._tasks(yaml.safe_load(path.read_text(encoding="utf-8"))):
            if task.get("name"):
                name = re.sub(r"\s+", " ", str(task["name"])).strip()
                ref = f"tests/integration/{target}::{name}"
                index.setdefault(ref, []).extend(_strings(task))
    return index


def _grams(text: str, size: int = 3) -> set[tuple[str, ...]]:
    words = re.findall(r"[\w'=./-]+", cat.normalise(text).replace("{}", " | ").lower())
    return {tuple(words[i : i + size]) for i in range(len(words) - size + 1) if "|" not in words[i : i + size]}


class Matcher:
    """Tests that quote a message: shared runs of three words that at most two messages have."""

    LAYERS = ("tests/unit", "tests/integration", "tests/vm", "tests/examples")

    def __init__(self, index: dict[str, list[str]], messages: dict[str, set[str]]) -> None:
        self.index = index
        self.messages = list(messages)
        self.files = {m: {site.rpartition(":")[0] for site in sites} for m, sites in messages.items()}
        self.spread: dict[tuple[str, ...], int] = {}
        for message in messages:
            for gram in _grams(message):
                self.spread[gram] = self.spread.get(gram, 0) + 1
        self.by_gram: dict[tuple[str, ...], set[str]] = {}
        for ref, strings in index.items():
            for text in strings:
                for gram in _grams(text):
                    if gram in self.spread:
                        self.by_gram.setdefault(gram, set()).add(ref)

    def distinctive(self, piece: str, message: str) -> bool:
        """Only this message has the piece, or one other message of the same file (a variant)."""
        others = [m for m in self.messages if piece in m and m != message]
        return not others or (len(others) == 1 and self.files[others[0]] == self.files[message])

    def best(self, message: str) -> str:
        """The test quoting the longest distinctive piece of the message (at least 14 characters)."""
        candidates: set[str] = set()
        for gram in _grams(message):
            if self.spread.get(gram, 99) <= 2:
                candidates.update(self.by_gram.get(gram, ()))
        chunks = [chunk for chunk in message.split("{}") if len(chunk.strip()) >= 8]
        scores: dict[str, int] = {}
        for ref in sorted(candidates):
            for text in self.index[ref]:
                text = cat.normalise(text)
                for chunk in chunks:
                    match = difflib.SequenceMatcher(None, text, chunk, autojunk=False).find_longest_match(
                        0, len(text), 0, len(chunk)
                    )
                    piece = chunk[match.b : match.b + match.size].strip()
                    enough = len(piece) >= max(14, min(20, int(len(chunk.strip()) * 0.8)))
                    if enough and len(piece) > scores.get(ref, 0) and self.distinctive(piece, message):
                        scores[ref] = len(piece)
        if not scores:
            return cat.NONE_YET
        layer = {ref: next(i for i, x in enumerate(self.LAYERS) if ref.startswith(x)) for ref in scores}
        return max(scores, key=lambda ref: (scores[ref], -layer[ref]))


def situation(site: str) -> str:
    path, dummy, line = site.rpartition(":")
    if not path.endswith(".py"):
        text = (ROOT / path).read_text(encoding="utf-8").splitlines()[int(line) - 1] if int(line) else ""
        name = text.split("name:", 1)[-1].strip() if "name:" in text else "a fail or assert task"
        return f"task `{name}`".replace("|", "\\|")
    src = cat._Source(ROOT / path, {})
    node = next(
        (n for n in ast.walk(src.tree) if isinstance(n, ast.Call) and getattr(n, "lineno", 0) == int(line)),
        None,
    ) or next((n for n in ast.walk(src.tree) if getattr(n, "lineno", 0) == int(line)), None)
    func = src.scope(node) if node else src.tree
    where = f"`{func.name}()`" if isinstance(func, ast.FunctionDef) else "module"
    cond = ""
    child = node
    while child in src.parents and child is not func:
        parent = src.parents[child]
        if isinstance(parent, ast.If) and child in parent.body:
            cond = ast.unparse(parent.test)
            break
        if isinstance(parent, ast.If) and child in parent.orelse:
            cond = f"not ({ast.unparse(parent.test)})"
            break
        if isinstance(parent, ast.ExceptHandler):
            cond = f"except {ast.unparse(parent.type) if parent.type else ''}"
            break
        child = parent
    cond = cond if len(cond) <= 90 else cond[:87] + "..."
    return f"{where}: `{cond}`".replace("|", "\\|") if cond else where


IO_FILES = ("_qmp.py", "_qemu_img.py", "_guest_agent.py", "plugins/connection/")


PLANNING = re.compile(
    r"^`_?(validate|check|plan|preflight|require|refuse|parse|read|find|from_|targets_from|request"
    r"|probe|describe|decide|select|_item|_protected|retention_select|report_lines|unit_name"
    r"|_refuse|_single|_require|mismatches|load|verify_record|label)"
)


def change(message: str, sites: set[str], where: str = "") -> str:
    if AFTER.search(message):
        return "after a partial change: the message says what was done and what holds"
    if UNCHANGED.search(message):
        return "nothing changed"
    if all(any(part in site for part in BEFORE_FILES) for site in sites) or PLANNING.search(where):
        return "nothing changed (refused while planning)"
    if all(any(part in site for part in IO_FILES) for site in sites):
        return "where it happens: while planning nothing changed; after acting began the task reports changed"
    return "while acting: the message says what holds"


def cell(message: str) -> str:
    ticks = "``" if "`" in message else "`"
    return f"{ticks}{message}{ticks}".replace("|", "\\|")


ORDER = ("plugins/modules/", "plugins/module_utils/", "plugins/connection/", "plugins/filter/", "roles/", "playbooks/")


def users(path: str) -> list[str]:
    """The modules, plugins and roles that use a core file (directly)."""
    name = pathlib.Path(path).stem
    found = []
    for plugin in sorted(ROOT.glob("plugins/*/*.py")):
        if plugin.parent.name != "module_utils" and re.search(rf"module_utils\.{name}\b", plugin.read_text()):
            found.append(plugin.stem)
    return found


def heading(path: str) -> str:
    if path.startswith("plugins/module_utils/"):
        used = users(path)
        return f"### `{path}`" + (f" (used by {', '.join(used)})" if used else "")
    return f"### `{path}`"


Hand = t.Dict[str, t.Tuple[str, str, str]]


def draft(messages: dict[str, set[str]], shown: dict[str, str] | None = None, hand: Hand | None = None) -> str:
    """The tables; `hand` gives (situation, change, test) for messages checked by hand."""
    matcher = Matcher(test_index(), messages)
    shown = shown or {}
    hand = hand or {}
    by_file: dict[str, list[str]] = {}
    for message, sites in messages.items():
        by_file.setdefault(sorted(sites)[0].rpartition(":")[0], []).append(message)
    head = ["| " + " | ".join(cat.HEADER) + " |", "|---|---|---|---|"]
    out: list[str] = []
    untested: list[str] = []
    for path in sorted(by_file, key=lambda p: (next(i for i, x in enumerate(ORDER) if p.startswith(x)), p)):
        rows = []
        for message in sorted(by_file[path], key=lambda m: sorted(messages[m])[0]):
            sites = messages[message]
            where, what, test = hand.get(message, ("", "", ""))
            where = where or situation(sorted(sites)[0])
            what = what or change(message, sites, where)
            test = test or matcher.best(message)
            text = cell(shown.get(message, message))
            if test == cat.NONE_YET:
                untested.append(f"| `{path}` {where} | {text} | {what} | {test} |")
            else:
                tests = "<br>".join(f"`{one}`" for one in test.split("<br>"))
                rows.append(f"| {where} | {text} | {what} | {tests} |")
        if rows:
            out += [heading(path), ""] + head + rows + [""]
    out += [cat.NONE_YET_HEADING, "", f"{len(untested)} refusals have no proving test yet.", ""] + head + untested
    return "\n".join(out)


def main(argv: list[str]) -> int:
    shown: dict[str, str] = {}
    messages = cat.code_messages(ROOT, shown)
    if "--check" in argv:
        problems = cat.check(ROOT)
        print("\n".join(problems))
        return 1 if problems else 0
    if "--all" not in argv and cat.CATALOGUE.exists():
        listed = "\n".join(cat.normalise(m) for row in cat.catalogue_rows() for m in row.messages)
        messages = {m: s for m, s in messages.items() if m not in listed}
    print(draft(messages, shown))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
