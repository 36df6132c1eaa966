"""The layout's rules, enforced: which package may import which (docs/layout.md), no import cycle
among calplug's modules, no module over 600 lines; one place per fact (the tested versions in
integrations/compat.py are the ones tox.ini pins, the tree in docs/layout.md is the tree on
disk); nothing a user gets points outside the repository."""
from __future__ import annotations

import ast
import configparser
import pathlib
import re

import pytest

from calplug.integrations import compat

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tox_config() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "tox.ini")
    return parser


def pins(name: str) -> dict[str, str]:
    """``{section: version}`` of every ``name==version`` pin in tox.ini (deps and commands)."""
    found = {}
    config = tox_config()
    for section in config.sections():
        for key in ("deps", "commands_pre", "commands"):
            for match in re.finditer(rf"(?m)\b{re.escape(name)}==([\w.]+)", config[section].get(key, "")):
                found[section] = match.group(1)
    return found


def test_tox_runs_exactly_the_tested_transformers_versions():
    matrix = {s: v for s, v in pins("transformers").items()
              if s == "testenv" or s.startswith("testenv:hf-")}
    assert sorted(matrix.values()) == sorted(compat.TESTED_VERSIONS), matrix
    for section, version in matrix.items():
        if section.startswith("testenv:hf-"):  # hf-4.45 runs 4.45.x
            assert version.startswith(section.removeprefix("testenv:hf-") + "."), (section, version)


FRAMEWORK_ENVS = {"llamafactory": "testenv:llamafactory", "axolotl": "testenv:axolotl",
                  "ms-swift": "testenv:swift"}


@pytest.mark.parametrize("package", ["llava-torch", "trl"])
def test_tox_pins_the_tested_codebases(package):
    """(The framework envs pin the TRL their framework requires; calplug's TRL support is tested
    in the distributed env.)"""
    found = {v for s, v in pins(package).items() if not s.startswith(tuple(FRAMEWORK_ENVS.values()))}
    assert found == {compat.TESTED_CODEBASES[package]}, found


@pytest.mark.parametrize("framework", sorted(compat.TESTED_FRAMEWORKS))
def test_tox_runs_the_tested_framework_releases(framework):
    release, transformers = compat.TESTED_FRAMEWORKS[framework]
    section = FRAMEWORK_ENVS[framework]
    assert pins(framework)[section] == release
    assert pins("transformers")[section] == transformers


@pytest.mark.parametrize("codebase, patch", [("LLaVA-NeXT", "llava-next"), ("MGM", "mgm")])
def test_patch_files_name_the_tested_commits(codebase, patch):
    commit = compat.TESTED_CODEBASES[codebase]
    path = ROOT / "patches" / f"{patch}-{commit}.patch"
    assert path.is_file(), f"no patch file for the tested {codebase} commit {commit}"
    header = dict(line.split(": ", 1) for line in path.read_text().splitlines()[1:8] if ": " in line)
    assert header["Commit"].startswith(commit)


def listed_in_layout() -> set[str]:
    """Paths of the tree in docs/layout.md, relative to the repository root."""
    text = (ROOT / "docs" / "layout.md").read_text()
    tree = text.split("```")[1]
    paths, stack = set(), []
    for line in tree.splitlines():
        if not line.strip():
            continue
        indent = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        stack = stack[:indent] + [name.rstrip("/")]
        paths.add("/".join(stack) + ("/" if name.endswith("/") else ""))
    return paths


def test_layout_doc_lists_every_module_and_nothing_gone():
    listed = listed_in_layout()
    modules = {str(p.relative_to(ROOT)) for folder in ("calplug", "integrations")
               for p in (ROOT / folder).rglob("*.py")}
    assert modules - listed == set(), "modules missing from docs/layout.md"
    for path in listed:
        assert (ROOT / path).exists(), f"docs/layout.md lists {path}, which does not exist"


def test_nothing_a_user_gets_points_outside_the_repository():
    """Docs, docstrings and comments stand alone: no planning notes outside the repository, no
    path of a developer's machine."""
    outside = re.compile(r"\.\./shared|shared/|UPSTREAMS|CAL_SPEC|/work/|/root/|/home/\w")
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in ("calplug", "integrations", "tests"):
        files += sorted((ROOT / folder).rglob("*.py"))
    offending = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                 for path in files for n, line in enumerate(path.read_text().splitlines(), 1)
                 if outside.search(line) and path.name != "test_layout.py"]
    assert offending == []


# -- which package may import which -----------------------------------------------------------------
# The source folder of each installed package (pyproject.toml maps integrations/ and patches/ into
# calplug's namespace).
PACKAGE_DIRS = {"calplug.integrations": "integrations", "calplug.patches": "patches", "calplug": "calplug"}
# Layer of a module -> the layers it may import. The core is every top-level module of calplug
# (tensor math, the step, the hooks): it asks integrations and frameworks through hooks and
# records, never by import. docs/layout.md has the same table.
MAY_IMPORT = {
    "core": {"core"},
    "integrations": {"core", "integrations"},
    "frameworks": {"core", "integrations", "frameworks"},
    "cli": {"core", "integrations", "frameworks", "cli"},
}
# The deliberately independent reference shares no code with what it checks.
REFERENCE_MAY_IMPORT = {"calplug.errors"}
MAX_LINES = 600


def layer(module: str) -> str:
    for prefix in ("integrations", "frameworks", "cli"):
        if module == f"calplug.{prefix}" or module.startswith(f"calplug.{prefix}."):
            return prefix
    return "core"


def module_files(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """``{module name: file}`` of every calplug module, by the installed names."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in (root / folder).rglob("*.py"):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package == "calplug" and parts[:1] in (["integrations"], ["patches"]):
                continue
            found[".".join([package, *parts])] = path
    return found


def imports_of(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The calplug modules ``module`` imports anywhere in its file: at module level, inside
    functions and under ``if TYPE_CHECKING``. ``from pkg import name`` counts ``pkg.name`` when
    that is a module, else ``pkg``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        found.update(n for n in names if n in known)
    found.discard(module)
    return found


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    return {m: imports_of(m, p, set(files)) for m, p in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import the table forbids, as ``"importer -> imported"``."""
    bad = []
    for module, targets in graph.items():
        for target in sorted(targets):
            allowed = MAY_IMPORT[layer(module)]
            if module == "calplug.reference":
                allowed_here = target in REFERENCE_MAY_IMPORT
            else:
                allowed_here = layer(target) in allowed
            if not allowed_here:
                bad.append(f"{module} ({layer(module)}) -> {target} ({layer(target)})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among calplug's modules (one path per strongly connected component)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_package_imports_against_the_layout_table():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle_among_calplug_modules():
    assert cycles(import_graph()) == []


def long_modules(root: pathlib.Path = ROOT) -> dict[str, int]:
    return {m: n for m, p in module_files(root).items() if (n := len(p.read_text().splitlines())) > MAX_LINES}


def test_no_module_over_600_lines():
    assert long_modules() == {}


def test_the_rules_fail_on_a_violation(tmp_path):
    """The checks above catch what they are for: a copy of the tree with an upward import (the
    core importing an integration), an import cycle hidden under TYPE_CHECKING, and a long module."""
    import shutil

    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, tmp_path / folder)
    gap = tmp_path / "calplug" / "gap.py"
    gap.write_text(gap.read_text() + "\nfrom .integrations import compat  # upward\n")
    weighting = tmp_path / "calplug" / "weighting.py"
    weighting.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import loss\n"
                         + weighting.read_text())
    loss = tmp_path / "calplug" / "loss.py"
    loss.write_text(loss.read_text() + "\nfrom . import weighting\n" + "\n" * MAX_LINES)
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == ["calplug.gap (core) -> calplug.integrations.compat (integrations)"]
    assert ["calplug.loss", "calplug.weighting"] in cycles(graph)
    assert list(long_modules(tmp_path)) == ["calplug.loss"]
