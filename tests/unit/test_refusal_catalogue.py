# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""docs/refusals.md lists every refusal message of the code, and every test it names exists.

Messages come from the code's AST (the argument of an error class's constructor, `X.msg = ...` re-wordings, the
message of an error class's own `__init__`) and from the `fail`/`assert` tasks of roles and playbooks. A message
built from a local variable, a concatenation, a conditional or a small helper in the same file is followed to its
string pieces. Placeholders (`{...}` of f-strings, `{{ ... }}` of Jinja, `{name}` in the table) all compare as `{}`.
"""

from __future__ import annotations

import ast
import builtins
import functools
import itertools
import pathlib
import re
import typing as t

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CATALOGUE = ROOT / "docs" / "refusals.md"
CODE_GLOBS = ("plugins/modules/*.py", "plugins/module_utils/*.py", "plugins/connection/*.py", "plugins/filter/*.py")
YAML_GLOBS = ("roles/*/tasks/*.yml", "playbooks/*.yml", "playbooks/tasks/*.yml")

ERROR_NAME = re.compile(r"(Error|Exception|Refusal|Failure|FileNotFound|Timeout)$")
# Raised and caught inside one file, never shown to a user: the native reader's decline, a start-up poll's timeout;
# and Python's own exceptions, which the code raises only as internal signals or guards (never a module's answer).
INTERNAL = {"_Unsupported", "_StartTimeout"} | {name for name in vars(builtins) if ERROR_NAME.search(name)}
# Classes whose message is not their first argument: (index of the text, the prefix the class adds).
MESSAGE_ARG = {"PreflightRefusal": (2, "VM {vm}: ")}
HEADER = ["Situation", "Message", "Change", "Test"]
NONE_YET = "none yet"
NONE_YET_HEADING = "## Refusals without a proving test yet"
MAX_VARIANTS = 32


def normalise(text: str) -> str:
    text = re.sub(r"\{\{.*?\}\}|\{%.*?%\}", "{}", text, flags=re.S)
    text = re.sub(r"\{[^{}]*\}", "{}", text)
    return re.sub(r"\s+", " ", text).strip()


def is_message(text: str) -> bool:
    """A text worth cataloguing: it has a word beyond placeholders and punctuation."""
    return bool(re.search(r"[A-Za-z]{2,}", text.replace("{}", " ")))


class _Source:
    """One Python file: its functions, for following names and helper calls to string pieces."""

    def __init__(self, path: pathlib.Path, helpers: dict[str, tuple[_Source, ast.AST]]) -> None:
        self.path = path
        self.helpers = helpers  # message helpers of every plugin file, by name
        self.display = False  # placeholders as {} (for comparing) or as {the expression} (for tools/refusals.py)
        self.tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        self.functions: dict[str, ast.AST] = {}
        self.parents: dict[ast.AST, ast.AST] = {}
        self._assigned: dict[ast.AST, dict[str, list[ast.AST]]] = {}
        self.nodes: list[ast.AST] = [self.tree]
        for node in self.nodes:  # grows while it is read: a breadth-first walk that records parents
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
                self.nodes.append(child)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions.setdefault(node.name, node)
                helpers.setdefault(node.name, (self, node))

    def scope(self, node: ast.AST) -> ast.AST:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node
        return self.tree

    def texts(self, expr: ast.AST | None, scope: ast.AST, depth: int = 0) -> list[str]:
        """The variants of a message expression, non-string parts as {}."""
        if expr is None or depth > 4:
            return [self._placeholder(expr)]
        if isinstance(expr, ast.Constant):
            return [expr.value] if isinstance(expr.value, str) else [self._placeholder(expr)]
        if isinstance(expr, ast.JoinedStr):
            pieces = []
            for value in expr.values:
                if isinstance(value, ast.Constant):
                    pieces.append([str(value.value)])
                elif isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name):
                    pieces.append(self._name(value.value.id, scope, depth, inline=True))
                else:
                    pieces.append([self._placeholder(getattr(value, "value", None))])
            return self._product(pieces)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return self._product([self.texts(expr.left, scope, depth + 1), self.texts(expr.right, scope, depth + 1)])
        if isinstance(expr, ast.IfExp):
            return self.texts(expr.body, scope, depth + 1) + self.texts(expr.orelse, scope, depth + 1)
        if isinstance(expr, ast.Name):
            return self._name(expr.id, scope, depth, inline=False)
        return [self._placeholder(expr)]

    def _placeholder(self, expr: ast.AST | None) -> str:
        if not self.display or expr is None:
            return "{}"
        return "{" + ast.unparse(expr).replace("{", "(").replace("}", ")") + "}"

    def _product(self, pieces: list[list[str]]) -> list[str]:
        joined = ["".join(combo) for combo in itertools.islice(itertools.product(*pieces), MAX_VARIANTS)]
        return list(dict.fromkeys(joined))

    def _assignments(self, scope: ast.AST) -> dict[str, list[ast.AST]]:
        """name -> the values assigned (`=`) and added (`+=`, as ast.AugAssign) to it in a scope."""
        if scope not in self._assigned:
            found: dict[str, list[ast.AST]] = {}
            for node in ast.walk(scope):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            found.setdefault(target.id, []).append(node.value)
                elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
                    found.setdefault(node.target.id, []).append(node)
            self._assigned[scope] = found
        return self._assigned[scope]

    def _name(self, name: str, scope: ast.AST, depth: int, inline: bool) -> list[str]:
        """A local variable's string values (only those that are strings when inlined into an f-string)."""
        found: list[str] = []
        for value in self._assignments(scope).get(name, []):
            if isinstance(value, ast.AugAssign):
                continue
            if inline and not isinstance(value, (ast.Constant, ast.JoinedStr, ast.BinOp, ast.IfExp)):
                continue
            found.extend(self.texts(value, scope, depth + 1))
        return list(dict.fromkeys(found)) or ["{" + name + "}" if self.display else "{}"]

    def extra_texts(self, expr: ast.AST, scope: ast.AST) -> list[str]:
        """Pieces a message gets elsewhere: `name += ...` additions, and a same-file helper's strings."""
        out: list[str] = []
        if isinstance(expr, ast.Name):
            for node in self._assignments(scope).get(expr.id, []):
                if isinstance(node, ast.AugAssign):
                    out.extend(self.texts(node.value, scope, 1))
        for node in ast.walk(expr):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not ERROR_NAME.search(node.func.id):
                if node.func.id in self.functions:
                    out.extend(self._helper_strings(self.functions[node.func.id]))
                elif node.func.id in self.helpers:
                    src, helper = self.helpers[node.func.id]
                    out.extend(src._helper_strings(helper))
        return out

    def _helper_strings(self, helper: ast.AST) -> list[str]:
        """What a message helper returns or collects into a list: its sentences of four words or more."""
        out: list[str] = []
        for node in ast.walk(helper):
            values: list[ast.AST] = []
            if isinstance(node, ast.Return) and node.value is not None:
                values.append(node.value)
            elif isinstance(node, ast.List):
                values.extend(node.elts)
            elif isinstance(node, ast.Call) and _call_name(node) in ("append", "extend") and node.args:
                arg = node.args[0]
                values.append(arg.elt if isinstance(arg, (ast.GeneratorExp, ast.ListComp)) else arg)
            for value in values:
                texts = self.texts(value, helper)
                out.extend(text for text in texts if len(re.findall(r"[A-Za-z]{2,}", normalise(text))) >= 4)
        return out


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def code_messages(root: pathlib.Path = ROOT, shown: dict[str, str] | None = None) -> dict[str, set[str]]:
    """Normalised message -> where it comes from ("file:line"); `shown` gets each with its placeholders' code."""
    found: dict[str, set[str]] = {}

    def add(texts: t.Iterable[str], where: str, line: int) -> None:
        for text in texts:
            if where.endswith(".yml"):
                text = re.sub(r"\{\{-?\s*(.*?)\s*-?\}\}", lambda m: "{" + re.sub(r"[{}]", "", m.group(1)) + "}", text)
            norm = normalise(text)
            if is_message(norm):
                found.setdefault(norm, set()).add(f"{where}:{line}")
                if shown is not None:
                    shown.setdefault(norm, re.sub(r"\s+", " ", text).strip())

    helpers: dict[str, tuple[_Source, ast.AST]] = {}
    sources = [_Source(path, helpers) for pattern in CODE_GLOBS for path in sorted(root.glob(pattern))]
    for src in sources:
        src.display = shown is not None
    for src in sources:
        path = src.path
        where = str(path.relative_to(root))
        for node in src.nodes:
            if isinstance(node, ast.Call):
                name = _call_name(node)
                scope = src.scope(node)
                if name == "fail_json":
                    msg = next((kw.value for kw in node.keywords if kw.arg == "msg"), None)
                    if not (isinstance(msg, ast.Attribute) and msg.attr == "msg"):  # do_fail's pass-through
                        add(src.texts(msg, scope) + src.extra_texts(msg, scope), where, node.lineno)
                elif ERROR_NAME.search(name) and name not in INTERNAL:
                    index, prefix = MESSAGE_ARG.get(name, (0, ""))
                    msg = node.args[index] if len(node.args) > index else None
                    msg = next((kw.value for kw in node.keywords if kw.arg in ("msg", "message", "text")), msg)
                    if msg is not None:
                        add(
                            [prefix + text for text in src.texts(msg, scope)] + src.extra_texts(msg, scope),
                            where,
                            node.lineno,
                        )
                elif name == "__init__" and isinstance(scope, ast.FunctionDef):
                    cls = src.parents.get(scope)
                    if isinstance(cls, ast.ClassDef) and ERROR_NAME.search(cls.name) and node.args:
                        add(src.texts(node.args[0], scope), where, node.lineno)
            elif isinstance(node, ast.Assign) and any(
                isinstance(x, ast.Attribute) and x.attr == "msg" for x in node.targets
            ):
                add(src.texts(node.value, src.scope(node)), where, node.lineno)
    for pattern in YAML_GLOBS:
        for path in sorted(root.glob(pattern)):
            where = str(path.relative_to(root))
            lines = path.read_text(encoding="utf-8").splitlines()
            for task in _tasks(_load_yaml(path)):
                for action in ("ansible.builtin.fail", "fail", "ansible.builtin.assert", "assert"):
                    args = task.get(action)
                    if isinstance(args, dict):
                        name = str(task.get("name", ""))
                        line = next((i for i, text in enumerate(lines, 1) if name and name in text), 0)
                        for key in ("msg", "fail_msg"):
                            if isinstance(args.get(key), str):
                                add([args[key]], where, line)
    return found


def _load_yaml(path: pathlib.Path) -> t.Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ten times faster
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 - a safe loader


def _tasks(data: t.Any) -> t.Iterator[dict[str, t.Any]]:
    if isinstance(data, list):
        for item in data:
            yield from _tasks(item)
    elif isinstance(data, dict):
        if any(key in data for key in ("block", "rescue", "always", "tasks", "pre_tasks", "post_tasks", "handlers")):
            for key in ("block", "rescue", "always", "tasks", "pre_tasks", "post_tasks", "handlers"):
                yield from _tasks(data.get(key))
        else:
            yield data


class Row(t.NamedTuple):
    line: int
    section: str
    situation: str
    messages: list[str]
    change: str
    tests: list[str]


def _cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [cell.strip().replace("\\|", "|") for cell in cells]


def catalogue_rows(path: pathlib.Path = CATALOGUE) -> list[Row]:
    rows: list[Row] = []
    section = ""
    header: list[str] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("## "):
            section = line.strip()
            header = None
        if not line.startswith("|"):
            header = None if not line.strip() else header
            continue
        cells = _cells(line)
        if header is None:
            header = cells
            continue
        if header != HEADER or all(re.fullmatch(r":?-+:?", cell) for cell in cells):
            continue
        situation, message, change, tests = (cells + [""] * 4)[:4]
        spans = [m.group(2) for m in re.finditer(r"(`+)\s?(.+?)\s?\1", message)]
        names = [name.strip().strip("`") for name in re.split(r"<br>|,\s(?=tests/)", tests) if name.strip()]
        rows.append(Row(number, section, situation, spans, change, names))
    return rows


@functools.cache
def _python_defs(path: pathlib.Path) -> frozenset[str]:
    """The test functions a file defines, as "name" or "Class::name" (pytest's places for them: top level, or
    one level into a class). Read line by line: parsing every test file would cost most of this test's time."""
    found = set()
    cls = None
    for line in path.read_text(encoding="utf-8").splitlines():
        top = re.match(r"(?:async\s+)?(def|class)\s+(\w+)", line)
        if top:
            cls = top.group(2) if top.group(1) == "class" else None
            found.add(top.group(2))
        elif cls and re.match(r"    (?:async\s+)?def\s+(\w+)", line):
            found.add(f"{cls}::{line.split('def', 1)[1].split('(')[0].strip()}")
        elif line and not line[0].isspace() and not line.startswith(("#", "@", ")", "]")):
            cls = None
    return frozenset(found)


@functools.cache
def _target_tasks(target: pathlib.Path) -> frozenset[str]:
    names = set()
    for task_file in target.glob("tasks/*.yml"):
        for task in _tasks(_load_yaml(task_file)):
            names.add(re.sub(r"\s+", " ", str(task.get("name", ""))).strip())
    return frozenset(names)


def _test_exists(reference: str, root: pathlib.Path) -> str | None:
    """None when the test exists, else why not."""
    parts = reference.split("::")
    path = root / parts[0]
    if not path.is_file():
        if path.is_dir() and parts[0].startswith("tests/integration/targets/") and len(parts) == 2:
            found = re.sub(r"\s+", " ", parts[1]).strip() in _target_tasks(path)
            return None if found else f"no task named {parts[1]!r}"
        return f"{parts[0]} does not exist"
    if len(parts) < 2:
        return "no test function named"
    name = "::".join(re.sub(r"\[.*\]$", "", part) for part in parts[1:])
    return None if name in _python_defs(path) else f"no test {name} in {parts[0]}"


def _covered(message: str, texts: list[str]) -> bool:
    """A row's message is made of the code's texts and placeholders only."""
    rest = message
    for text in texts:  # longest first
        if text in rest:
            rest = rest.replace(text, "{}")
    return not re.sub(r"\{\}|\s", "", rest)


def check(root: pathlib.Path = ROOT, catalogue: pathlib.Path = CATALOGUE) -> list[str]:
    """Every problem of the catalogue against the code, as one line each."""
    problems: list[str] = []
    code = code_messages(root)
    texts = sorted(code, key=len, reverse=True)
    rows = catalogue_rows(catalogue)
    listed: dict[str, int] = {}
    for row in rows:
        if not row.messages:
            problems.append(f"line {row.line}: no message in backticks")
        for message in row.messages:
            norm = normalise(message)
            if norm in listed:
                problems.append(f"line {row.line}: message also on line {listed[norm]}: {message}")
            listed.setdefault(norm, row.line)
            if not _covered(norm, texts):
                problems.append(f"line {row.line}: message not in the code (changed or removed?): {message}")
        if not row.tests:
            problems.append(f"line {row.line}: no test named (write `{NONE_YET}` in the last section)")
        for name in row.tests:
            if name == NONE_YET:
                if row.section != NONE_YET_HEADING:
                    problems.append(f"line {row.line}: '{NONE_YET}' belongs in the section {NONE_YET_HEADING!r}")
                continue
            if row.section == NONE_YET_HEADING:
                problems.append(f"line {row.line}: a row with a test belongs in the sections above")
            why = _test_exists(name, root)
            if why:
                problems.append(f"line {row.line}: test {name}: {why}")
    everything = "\n".join(listed)
    for norm, files in sorted(code.items()):
        if norm not in everything:
            problems.append(f"not in docs/refusals.md ({', '.join(sorted(files))}): {norm}")
    missing = sum(1 for row in rows if row.section == NONE_YET_HEADING)
    text = catalogue.read_text(encoding="utf-8")
    claim = re.search(r"(\d+) refusals? (?:has|have) no proving test yet", text)
    if claim is None or int(claim.group(1)) != missing:
        problems.append(f"the page must say '{missing} refusals have no proving test yet'")
    return problems


def test_every_refusal_is_catalogued_with_a_real_test() -> None:
    problems = check()
    assert not problems, f"{len(problems)} problem(s) in docs/refusals.md:\n" + "\n".join(problems)


def test_the_catalogue_has_enough_rows() -> None:
    rows = catalogue_rows()
    assert len(rows) >= 80
    assert all(row.change for row in rows)
