"""The patch files (patches/*.patch), the patch engine (calplug/patching.py) and `calplug patch`
(calplug/cli/patch.py).

Three layers:
* the command on a synthetic checkout built from each patch's own context lines (runs anywhere):
  apply, `--reverse` byte-identical, drift refused with the conflicting lines named and nothing
  written, already-applied / not-applied, a checkout inside a bigger git repository, the
  git-less Python engine equal to `git apply`;
* the LLaVA patch on the real upstream files of `llava-torch==1.2.2.post1` (the wheel named by
  CALPLUG_LLAVA_WHEEL, which `tox -e patches` downloads, or an installed llava-torch): it applies
  and reverses byte-identically, the patched train.py parses the CAL flags, and its `train()`
  runs two optimiser steps of a tiny LLaVA with CAL on (loss differs from CAL off) and with CAL
  limited to another stage (loss equals CAL off);
* MGM and LLaVA-NeXT from source folders (CALPLUG_MGM_SRC, CALPLUG_LLAVA_NEXT_SRC): the patch
  applies and reverses byte-identically; where the environment has the codebase's dependencies
  (else a skip naming the failed import), the patched train.py parses the CAL flags and its
  train() runs the same three two-step runs.

The training runs happen in a subprocess (this file run as a script) so the patched `llava`
package never mixes with anything imported in the test process.
"""
from __future__ import annotations

import atexit
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from calplug import cli
from calplug import patching
from calplug.patching import PatchConflictError
from _skips import missing

LLAVA = "llava-v1.2.2"
LLAVA_VERSION = "1.2.2.post1"
PATCH_ENV = {"mgm": "CALPLUG_MGM_SRC", "llava-next": "CALPLUG_LLAVA_NEXT_SRC"}
HAS_GIT = shutil.which("git") is not None


# -- helpers --------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root: bytes and mode (a .git folder excluded)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file() and ".git" not in p.relative_to(root).parts}


def synthetic_checkout(patch, root: Path) -> Path:
    """A checkout that matches the patch's context exactly: each hunk's preimage at the line the
    patch names, filler lines elsewhere, plus an unrelated file."""
    for fd in patch.files:
        lines: list[str] = []
        for n, hunk in enumerate(fd.hunks):
            while len(lines) < hunk.old_start - 1:
                lines.append(f"# upstream line {len(lines) + 1} of {fd.path}")
            lines.extend(hunk.old)
        lines += [f"# upstream tail {k}" for k in range(5)]
        target = root / fd.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join(lines) + "\n")
    (root / "README.md").write_text("a fork\n")
    return root


def run_cli(*argv: str, capsys) -> tuple[int, str, str]:
    rc = cli.main(["patch", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- the shipped files ----------------------------------------------------------------------------
def test_every_patch_names_its_upstream_commit_and_files():
    patches = patching.available()
    names = {p.name for p in patches}
    assert {LLAVA, "mgm-769820c", "llava-next-df17966"} <= names
    for p in patches:
        commit = p.header["Commit"]
        assert len(commit) == 40 and int(commit, 16) >= 0, (p.name, commit)
        assert p.header["Upstream"].startswith("https://github.com/")
        # the short commit in the file name is the header's commit
        if p.name != LLAVA:
            assert p.name.endswith("-" + commit[:7]), p.name
        assert p.header["Files"].split(", ") == [f.path for f in p.files]
        text = p.text
        # the patch adds the flags and one call; calplug's logic stays in calplug
        for flag in ("use_cal", "cal_alpha", "cal_beta", "cal_pool_window", "cal_contrast",
                     "cal_config", "cal_stages"):
            assert f"+    {flag}: " in text, (p.name, flag)
        added = [l for l in text.splitlines() if l.startswith("+") and not l.startswith("+++")]
        assert sum("calplug.enable_for_stage(model" in l for l in added) == 1
        assert p.added < 30, (p.name, p.added)


def test_list_shows_each_patch_and_its_state_in_a_checkout(tmp_path, capsys):
    rc, out, _ = run_cli("list", capsys=capsys)
    assert rc == 0
    for p in patching.available():
        assert p.name in out and p.header["Commit"][:7] in out
    checkout = synthetic_checkout(patching.resolve(LLAVA), tmp_path / "LLaVA")
    rc, out, _ = run_cli("list", str(checkout), capsys=capsys)
    line = next(l for l in out.splitlines() if l.strip().startswith(LLAVA))
    assert line.endswith("[applies]")
    mgm_line = next(l for l in out.splitlines() if l.strip().startswith("mgm-"))
    assert mgm_line.endswith("[missing]")


def test_patch_files_ship_inside_the_installed_package():
    import calplug

    folder = patching.patch_dir()
    package = Path(calplug.__file__).resolve().parent
    repo_copy = package.parent / "patches"
    if folder == repo_copy.resolve() and (package.parent / "pyproject.toml").is_file():
        missing("patches", "calplug is imported from a source checkout (editable install); "
                           "`tox -e patches` installs the wheel and runs this check")
    assert folder.resolve() == (package / "patches").resolve()
    assert (folder / f"{LLAVA}.patch").is_file()


def _glue_block(patch) -> str:
    """The lines the patch adds inside train(): the `if training_args.use_cal:` block."""
    hunk = next(h for h in patch.files[0].hunks if any("enable_for_stage" in l for l in h.new))
    added = [l for l in hunk.new if l not in hunk.old]
    return textwrap.dedent("\n".join(added))


STAGE_CASES = {
    # name prefix: [(model_args, training_args extra, expected stage)]
    "llava-v1": [({"tune_mm_mlp_adapter": True}, {}, "pretrain"),
                 ({"tune_mm_mlp_adapter": False}, {}, "finetune")],
    "mgm-": [({"tune_mm_mlp_adapter": True}, {}, "pretrain"),
             ({"tune_mm_mlp_adapter": False}, {}, "finetune")],
    "llava-next-": [
        ({"mm_tunable_parts": "mm_mlp_adapter", "tune_mm_mlp_adapter": False}, {}, "pretrain"),
        ({"mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
          "tune_mm_mlp_adapter": False}, {}, "finetune"),
        ({"mm_tunable_parts": None, "tune_mm_mlp_adapter": True}, {}, "pretrain"),
        ({"mm_tunable_parts": None, "tune_mm_mlp_adapter": False}, {}, "finetune"),
        ({"mm_tunable_parts": "mm_mlp_adapter", "tune_mm_mlp_adapter": False},
         {"lora_enable": True}, "finetune"),
    ],
}


@pytest.mark.parametrize("name", [LLAVA, "mgm-769820c", "llava-next-df17966"])
def test_patch_glue_passes_stage_flags_and_config_to_calplug(name, monkeypatch, tmp_path):
    """The block each patch adds to train(), run as written with calplug's enable_for_stage
    recorded: the stage each codebase's arguments imply, only the flags that were set, and the
    --cal_config path; nothing at all with --use_cal False."""
    import types

    import calplug

    block = _glue_block(patching.resolve(name))
    calls = []
    monkeypatch.setattr(calplug, "enable_for_stage",
                        lambda model, stage, config=None, **kw: calls.append((model, stage, config, kw)) or True)
    monkeypatch.setattr(calplug, "config_of", lambda model: "cfg")
    cases = next(v for k, v in STAGE_CASES.items() if name.startswith(k))
    for model_kw, train_kw, stage in cases:
        flags = dict(use_cal=True, cal_config=str(tmp_path / "cal.yaml"), cal_alpha=None, cal_beta=4.0,
                     cal_pool_window=None, cal_contrast="mask", cal_stages=None, lora_enable=False)
        flags.update(train_kw)
        env = {"model": object(), "model_args": types.SimpleNamespace(**model_kw),
               "training_args": types.SimpleNamespace(**flags), "rank0_print": lambda *a: None}
        calls.clear()
        exec(compile(block, name, "exec"), env)
        assert len(calls) == 1, (name, model_kw)
        model, got_stage, config, overrides = calls[0]
        assert model is env["model"] and got_stage == stage, (name, model_kw, train_kw)
        assert config == flags["cal_config"]
        assert overrides == {"beta": 4.0, "contrast": "mask"}
        env["training_args"].use_cal = False
        calls.clear()
        exec(compile(block, name, "exec"), env)
        assert calls == []


# -- the command on a synthetic checkout ----------------------------------------------------------
def test_apply_then_reverse_is_byte_identical(tmp_path, capsys, engine):
    patch = patching.resolve(LLAVA)
    root = synthetic_checkout(patch, tmp_path / "LLaVA")
    (root / "llava/train/train.py").chmod(0o640)   # git apply would recreate it with the umask's
    before = snapshot(root)
    rc, out, err = run_cli("apply", LLAVA, str(root), capsys=capsys)
    assert rc == 0, err
    after = snapshot(root)
    changed = [k for k in before if before[k] != after[k]]
    assert changed == ["llava/train/train.py"]
    text = (root / "llava/train/train.py").read_text()
    assert "use_cal: bool = field(default=False" in text and "calplug.enable_for_stage(model" in text
    assert "--use_cal True" in out
    rc, out, err = run_cli("apply", "--reverse", LLAVA, str(root), capsys=capsys)
    assert rc == 0, err
    assert snapshot(root) == before


def test_python_engine_writes_what_git_apply_writes(tmp_path):
    if not HAS_GIT:
        missing("git", "git is not installed: nothing to compare the Python engine with "
                       "(apt-get install git)")
    for patch in patching.available():
        a = synthetic_checkout(patch, tmp_path / f"{patch.name}-git")
        b = synthetic_checkout(patch, tmp_path / f"{patch.name}-py")
        patching.apply(patch, a)
        patching._apply_python(patch, b, reverse=False)
        assert snapshot(a) == snapshot(b), patch.name


def drift(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def test_drift_is_refused_naming_the_conflicting_lines_and_nothing_changes(tmp_path, capsys, engine):
    patch = patching.resolve(LLAVA)
    root = synthetic_checkout(patch, tmp_path / "fork")
    train = root / "llava/train/train.py"
    # a fork changed a context line of the second hunk (the Trainer call) and nothing else
    hunk = patch.files[0].hunks[1]
    context = next(l for l in hunk.old if "LLaVATrainer(" in l)
    drift(train, context + "\n", context.replace("LLaVATrainer(", "MyForkTrainer(") + "\n")
    line_no = train.read_text().splitlines().index(context.replace("LLaVATrainer(", "MyForkTrainer(")) + 1
    before = snapshot(root)
    rc, out, err = run_cli("apply", LLAVA, str(root), capsys=capsys)
    assert rc == 1
    assert snapshot(root) == before
    assert "drifted" in err and "Nothing was changed" in err
    assert "llava/train/train.py, hunk 2 of 2" in err
    assert "hunk 1 of 2" not in err                    # the first hunk still fits
    assert f"line {line_no}: expected {context!r}" in err
    assert "MyForkTrainer(" in err
    # --check reports the same and also writes nothing
    rc, _, err2 = run_cli("apply", "--check", LLAVA, str(root), capsys=capsys)
    assert rc == 1 and err2 == err and snapshot(root) == before


def test_half_fitting_fork_is_not_half_applied(tmp_path, engine):
    """Hunk 1 fits, hunk 2 does not: the library call raises and the file keeps its bytes."""
    patch = patching.resolve(LLAVA)
    root = synthetic_checkout(patch, tmp_path / "fork")
    train = root / "llava/train/train.py"
    first_context = patch.files[0].hunks[1].old[0]
    drift(train, first_context + "\n", first_context + "  # fork\n")
    before = train.read_bytes()
    with pytest.raises(PatchConflictError, match="hunk 2 of 2"):
        patching.apply(patch, root)
    assert train.read_bytes() == before


def test_crlf_checkout_is_refused_not_rewritten(tmp_path, capsys, engine):
    """A checkout with Windows line endings does not match the patch's context (as in git);
    the refusal must leave every byte, carriage returns included, where it was."""
    root = synthetic_checkout(patching.resolve(LLAVA), tmp_path / "fork")
    train = root / "llava/train/train.py"
    train.write_bytes(train.read_bytes().replace(b"\n", b"\r\n"))
    before = snapshot(root)
    rc, _, err = run_cli("apply", LLAVA, str(root), capsys=capsys)
    assert rc == 1 and "Nothing was changed" in err and "(CRLF) line endings" in err
    assert snapshot(root) == before


def test_already_applied_and_not_applied_are_refused(tmp_path, capsys, engine):
    root = synthetic_checkout(patching.resolve(LLAVA), tmp_path / "fork")
    rc, _, err = run_cli("apply", "--reverse", LLAVA, str(root), capsys=capsys)
    assert rc == 1 and "is not applied" in err and "nothing to undo" in err
    assert run_cli("apply", LLAVA, str(root), capsys=capsys)[0] == 0
    applied = snapshot(root)
    rc, _, err = run_cli("apply", LLAVA, str(root), capsys=capsys)
    assert rc == 1 and "already applied" in err and "--reverse" in err
    assert snapshot(root) == applied


def test_wrong_folder_and_unknown_name_give_clear_errors(tmp_path, capsys):
    root = synthetic_checkout(patching.resolve(LLAVA), tmp_path / "LLaVA")
    rc, _, err = run_cli("apply", LLAVA, str(tmp_path), capsys=capsys)   # one level too high
    assert rc == 1 and "llava/train/train.py not found" in err
    assert f"Did you mean {str(root)!r}" in err
    rc, _, err = run_cli("apply", "llava-v1.2", str(root), capsys=capsys)  # unique prefix works
    assert rc == 0
    rc, _, err = run_cli("apply", "llava", str(root), capsys=capsys)       # ambiguous prefix
    assert rc == 2 and "matches several patches" in err
    rc, _, err = run_cli("apply", "lava-v1.2.2", str(root), capsys=capsys)
    assert rc == 2 and f"Did you mean {LLAVA!r}" in err
    rc, _, err = run_cli("apply", LLAVA, str(tmp_path / "nope"), capsys=capsys)
    assert rc == 2 and "is not a folder" in err


def test_checkout_inside_a_bigger_git_repository(tmp_path, capsys):
    """Inside a repository, plain `git apply` reads paths from the repository root and silently
    skips files outside the current folder; the command must patch PATH itself."""
    if not HAS_GIT:
        missing("git", "git is not installed: this test builds a git repository (apt-get install git)")
    outer = tmp_path / "monorepo"
    outer.mkdir()
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    root = synthetic_checkout(patching.resolve(LLAVA), outer / "third_party" / "LLaVA")
    before = snapshot(root)
    rc, _, err = run_cli("apply", LLAVA, str(root), capsys=capsys)
    assert rc == 0, err
    assert "calplug.enable_for_stage" in (root / "llava/train/train.py").read_text()
    assert run_cli("apply", "-R", LLAVA, str(root), capsys=capsys)[0] == 0
    assert snapshot(root) == before


# -- real upstream sources ------------------------------------------------------------------------
def llava_sources(dest: Path) -> Path:
    """Unpack the upstream llava-torch==1.2.2.post1 files into dest; skip when they are absent."""
    wheel = os.environ.get("CALPLUG_LLAVA_WHEEL")
    if wheel:
        path = Path(wheel)
        if path.is_dir():
            found = sorted(path.glob(f"llava_torch-{LLAVA_VERSION}-*.whl"))
            if not found:
                pytest.fail(f"CALPLUG_LLAVA_WHEEL={wheel} holds no llava_torch-{LLAVA_VERSION} wheel")
            path = found[0]
        with zipfile.ZipFile(path) as zf:
            zf.extractall(dest, [n for n in zf.namelist() if n.startswith("llava/")])
        return dest
    try:
        dist = importlib.metadata.distribution("llava-torch")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is None or dist.version != LLAVA_VERSION:
        missing("patches", f"needs the llava-torch=={LLAVA_VERSION} files: set CALPLUG_LLAVA_WHEEL to "
                           "its wheel (or a folder holding it), or install it --no-deps; `tox -e "
                           "patches` does")
    for f in dist.files or []:
        if str(f).startswith("llava/"):
            target = dest / str(f)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f.locate(), target)
    return dest


def run_driver(*args: str, src: Path, timeout: int = 600) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true", HF_HUB_OFFLINE="1")
    env.pop("CALPLUG_CONFIG", None)
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=src)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not last.startswith("{"):
        raise AssertionError(f"driver {args} failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    result = json.loads(last)
    if "skip" in result:
        missing(result["needs"], result["skip"])
    return result


@pytest.fixture(scope="module")
def patched_llava(tmp_path_factory):
    src = llava_sources(tmp_path_factory.mktemp("llava-upstream"))
    pristine = snapshot(src)
    patch = patching.resolve(LLAVA)
    patching.apply(patch, src)
    return src, pristine


def test_llava_patch_on_the_upstream_package_reverses_byte_identically(patched_llava, capsys):
    src, pristine = patched_llava
    copy = src.parent / "roundtrip"
    shutil.copytree(src, copy)
    assert snapshot(copy) != pristine
    rc, _, err = run_cli("apply", "--reverse", LLAVA, str(copy), capsys=capsys)
    assert rc == 0, err
    assert snapshot(copy) == pristine
    rc, _, err = run_cli("apply", LLAVA, str(copy), capsys=capsys)
    assert rc == 0, err
    assert snapshot(copy) == snapshot(src)


def test_patched_llava_parses_the_cal_flags(patched_llava):
    src, _ = patched_llava
    got = run_driver("parse", "llava", "--output_dir", str(src / "out"), "--use_cal", "True",
                     "--cal_alpha", "1.5", "--cal_contrast", "mask", "--cal_stages", "finetune", src=src)
    assert got["module"].startswith(str(src))
    assert got["use_cal"] is True and got["cal_alpha"] == 1.5 and got["cal_contrast"] == "mask"
    assert got["cal_stages"] == "finetune"
    # unset flags stay None so calplug's defaults (or the --cal_config file) decide
    assert got["cal_beta"] is None and got["cal_pool_window"] is None and got["cal_config"] is None
    off = run_driver("parse", "llava", "--output_dir", str(src / "out"), src=src)
    assert off["use_cal"] is False


def check_training(got: dict, integration: str = "llava-style") -> None:
    off, on, other_stage = got["off"], got["on"], got["other_stage"]
    for run in (off, on, other_stage):
        assert run["global_step"] == 2 and len(run["losses"]) == 2
        assert all(l == l and 0 < l < 50 for l in run["losses"]), run   # finite, positive
    assert off["enable_calls"] == []                                     # CAL off: no calplug call
    # CAL on: the call happened in the finetune stage with the flags and the YAML file merged
    (call,) = on["enable_calls"]
    assert call["stage"] == "finetune" and call["enabled"] is True
    assert call["config"]["alpha"] == 0.0                 # --cal_alpha overrides the file's 3.0
    assert call["config"]["pool_scope"] == "sequence"     # from --cal_config
    assert call["config"]["contrast"] == "mask" and call["config"]["pool_window"] == 1
    assert call["integration"] == integration
    # The loss is the weight-normalised mean, so it moves only where weights differ between
    # tokens: alpha=0 leaves the gaps of this untrained model unclamped (with alpha=1, the
    # default, every gap of an untrained model is clamped up to 1 and the loss equals CAL off).
    assert abs(on["losses"][0] - off["losses"][0]) > 1e-4 * abs(off["losses"][0])
    # --cal_stages pretrain in a finetune run: CAL stays off and the run equals the plain one
    (call,) = other_stage["enable_calls"]
    assert call["stage"] == "finetune" and call["enabled"] is False
    assert other_stage["losses"] == off["losses"]


@pytest.mark.slow
def test_patched_llava_trains_two_steps_with_cal(patched_llava):
    src, _ = patched_llava
    got = run_driver("train", "llava", src=src)
    assert got["module"].startswith(str(src))
    check_training(got)


def fork_checkout(name: str, dest: Path):
    var = PATCH_ENV[name]
    folder = os.environ.get(var)
    if not folder:
        missing(name, f"set {var}=/path/to/the {name} source checkout to check its patch")
    patch = next(p for p in patching.available() if p.name.startswith(name + "-")
                 and p.name[len(name) + 1:].isalnum())
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(".git", "*.png", "*.jpg", "*.gif"))
    return patch, dest


@pytest.mark.parametrize("name", sorted(PATCH_ENV))
def test_fork_patch_applies_to_upstream_source_and_reverses(name, tmp_path, capsys):
    patch, root = fork_checkout(name, tmp_path / name)
    pristine = snapshot(root)
    rc, _, err = run_cli("apply", patch.name, str(root), capsys=capsys)
    assert rc == 0, err
    train_py = root / patch.files[0].path
    compile(train_py.read_text(), str(train_py), "exec")     # the patched file is valid Python
    rc, _, err = run_cli("apply", "-R", patch.name, str(root), capsys=capsys)
    assert rc == 0, err
    assert snapshot(root) == pristine


@pytest.mark.parametrize("name", sorted(PATCH_ENV))
def test_fork_patch_parses_the_cal_flags(name, tmp_path):
    patch, root = fork_checkout(name, tmp_path / name)
    patching.apply(patch, root)
    got = run_driver("parse", name, "--output_dir", str(root / "out"), "--use_cal", "True",
                     "--cal_beta", "4", "--cal_pool_window", "5", src=root)
    assert got["module"].startswith(str(root))
    assert got["use_cal"] is True and got["cal_beta"] == 4.0 and got["cal_pool_window"] == 5
    assert got["cal_alpha"] is None


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PATCH_ENV))
def test_fork_patch_trains_two_steps_with_cal(name, tmp_path):
    patch, root = fork_checkout(name, tmp_path / name)
    patching.apply(patch, root)
    got = run_driver("train", name, src=root)
    assert got["module"].startswith(str(root))
    check_training(got, integration="mgm" if name == "mgm" else "llava-style")


# -- the driver (this file run as a script, in a subprocess) -------------------------------------
# flags a codebase's train() needs on a CPU (LLaVA-NeXT defaults to flash attention and checkpointing)
TRAIN_EXTRA_ARGS = {"llava-next": ["--attn_implementation", "sdpa", "--gradient_checkpointing", "False"]}
TRAIN_MODULE = {"llava": "llava.train.train", "llava-next": "llava.train.train", "mgm": "mgm.train.train"}


def _emit(obj) -> None:
    print(json.dumps(obj), flush=True)


def _import_train(codebase: str):
    import contextlib
    import importlib
    import io

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            module = importlib.import_module(TRAIN_MODULE[codebase])
    except ImportError as exc:
        sys.stdout.write(printed.getvalue())
        absent = _not_installed(exc, printed.getvalue())
        if absent is None:
            raise              # the patched codebase itself fails to import: a real failure
        _emit({"skip": f"the patched {TRAIN_MODULE[codebase]} imports {absent!r}, which is not "
                       f"installed here: run it in an environment with {codebase}'s dependencies",
               "needs": "patches" if codebase == "llava" else codebase})
        raise SystemExit(0)
    sys.stdout.write(printed.getvalue())
    return module


def _not_installed(exc: ImportError, printed: str) -> str | None:
    """The third-party module whose absence made the import fail, or None when the failure is
    anything else (a module of the checkout, a name missing from an installed package, a broken
    install): only "not installed" may skip. LLaVA-NeXT's llava/model/__init__.py catches its
    own import errors, prints them and carries on, so what it printed is read too."""
    names = [exc.name] if isinstance(exc, ModuleNotFoundError) else []
    if not names:
        names = re.findall(r"No module named '([\w.]+)'", printed)
    for name in names:
        top = (name or "").split(".")[0]
        in_checkout = (Path.cwd() / top).is_dir() or (Path.cwd() / f"{top}.py").is_file()
        if top and not in_checkout:
            return name
    return None


def _drive_parse(codebase: str, argv: list[str]) -> None:
    import transformers

    train = _import_train(codebase)
    parser = transformers.HfArgumentParser((train.ModelArguments, train.DataArguments, train.TrainingArguments))
    _, _, targs = parser.parse_args_into_dataclasses(argv)
    fields = ["use_cal", "cal_config", "cal_alpha", "cal_beta", "cal_pool_window", "cal_contrast", "cal_stages"]
    _emit({"module": train.__file__, **{f: getattr(targs, f) for f in fields}})


def _tiny_assets(root: Path) -> dict[str, str]:
    """A tiny Llama checkpoint with a word-level tokenizer, a tiny CLIP vision tower, 4 samples."""
    import torch
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM, PreTrainedTokenizerFast)

    words = ("a red green blue small large square circle on the left right top bottom of field "
             "picture shows image with and").split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    llm = root / "tiny-llama"   # LLaVA-NeXT picks the model class from "llama" in the path
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(llm)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128)).save_pretrained(llm)
    clip = root / "openai-tiny-clip"  # MGM builds a CLIP tower only when the path contains "openai"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=32, patch_size=8)).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    images = root / "images"
    images.mkdir()
    answers = ["a red square on the left of the field", "a small blue circle on the top right",
               "the picture shows a large green square", "a blue square and a red circle"]
    data = []
    for i, answer in enumerate(answers):
        colour = [(200, 30, 30), (30, 30, 200), (30, 200, 30), (120, 60, 200)][i]
        Image.new("RGB", (40, 40), colour).save(images / f"{i}.png")
        data.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": answer}]})
    (root / "data.json").write_text(json.dumps(data))
    (root / "cal.yaml").write_text("alpha: 3.0\nbeta: 5.0\npool_scope: sequence\n")
    return {"llm": str(llm), "clip": str(clip), "images": str(images), "data": str(root / "data.json"),
            "cal_yaml": str(root / "cal.yaml")}


def _drive_train(codebase: str) -> None:
    import tempfile

    import torch
    import transformers

    import calplug

    train = _import_train(codebase)
    if codebase == "llava-next":
        # Upstream bugs at df17966, with or without the patch: llava/train/llava_trainer.py copies
        # transformers' Trainer._inner_training_loop but not its imports (DebugOption, ...), and
        # ends it with plot_graphs_based_on_log_history(...), defined nowhere in the repository:
        # every training run stops with a NameError. Supply the names from the module it copied,
        # and the plot (drawn after the last step) as a no-op.
        import transformers.trainer as hf_trainer

        trainer_module = sys.modules["llava.train.llava_trainer"]
        for key, value in vars(hf_trainer).items():
            trainer_module.__dict__.setdefault(key, value)
        trainer_module.__dict__.setdefault("plot_graphs_based_on_log_history", lambda **kw: None)
        # Its save (safe_save_model_for_hf_trainer) calls torch.cuda.synchronize() unconditionally;
        # without CUDA there is nothing to wait for.
        if not torch.cuda.is_available():
            torch.cuda.synchronize = lambda *a, **k: None
    root = Path(tempfile.mkdtemp(prefix="calplug-patch-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # also on the SystemExit(0) skip
    assets = _tiny_assets(root)

    calls: list[dict] = []
    real_enable_for_stage = calplug.enable_for_stage

    def recording_enable_for_stage(model, stage, config=None, **overrides):  # spy: calls the real one
        enabled = real_enable_for_stage(model, stage, config, **overrides)
        state = calplug.enabling.unwrap_model(model).__dict__.get(calplug.step.STATE_ATTR)
        calls.append({"stage": stage, "enabled": enabled,
                      "config": calplug.resolve_config(config, **overrides).to_dict(),
                      "integration": state.integration.name if state else None})
        return enabled

    calplug.enable_for_stage = recording_enable_for_stage

    losses: list[float] = []
    real_step = transformers.Trainer.training_step

    def recording_step(self, model, inputs, *args, **kwargs):
        loss = real_step(self, model, inputs, *args, **kwargs)
        losses.append(float(loss))
        return loss

    transformers.Trainer.training_step = recording_step

    common = ["--model_name_or_path", assets["llm"], "--version", "plain",
              "--vision_tower", assets["clip"], "--mm_projector_type", "mlp2x_gelu",
              "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
              "--mm_use_im_patch_token", "False", "--data_path", assets["data"],
              "--image_folder", assets["images"], "--per_device_train_batch_size", "2",
              "--max_steps", "2", "--learning_rate", "1e-2", "--logging_steps", "1",
              "--save_strategy", "no", "--report_to", "none", "--model_max_length", "64",
              "--dataloader_num_workers", "0", "--seed", "0", "--use_cpu", "True",
              *TRAIN_EXTRA_ARGS.get(codebase, [])]
    runs = {"off": [],
            "on": ["--use_cal", "True", "--cal_config", assets["cal_yaml"], "--cal_alpha", "0",
                   "--cal_contrast", "mask", "--cal_pool_window", "1"],
            "other_stage": ["--use_cal", "True", "--cal_stages", "pretrain"]}
    results = {}
    for name, extra in runs.items():
        calls.clear()
        losses.clear()
        out = root / f"out-{name}"
        sys.argv = ["train.py", *common, "--output_dir", str(out), *extra]
        torch.manual_seed(0)            # the projector is initialised before the Trainer seeds
        train.train()
        state = json.loads((out / "trainer_state.json").read_text())
        results[name] = {"losses": list(losses), "global_step": state["global_step"],
                         "enable_calls": list(calls)}
    results["module"] = train.__file__
    _emit(results)


if __name__ == "__main__":
    _action, _codebase, *_rest = sys.argv[1:]
    if _action == "parse":
        _drive_parse(_codebase, _rest)
    else:
        _drive_train(_codebase)
