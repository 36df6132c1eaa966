"""One place per fact: the tested versions in integrations/compat.py are the ones tox.ini pins, the
tree in docs/layout.md is the tree on disk, and nothing a user gets points outside the repository."""
from __future__ import annotations

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
