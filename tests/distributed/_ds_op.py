"""DeepSpeed's CPU communication op (``deepspeed_shm_comm``), built once per machine and kept in a cache.

On a CPU, ``deepspeed.init_distributed`` loads this op, and a pip-installed DeepSpeed JIT-builds it
(about a minute of compiler time). Built inside the env (``TORCH_EXTENSIONS_DIR={envdir}/...``) it
is rebuilt on every fresh clone: the compile commands name the env's absolute paths, so ninja sees
new commands. So the distributed env builds it once into a package cache, keyed by what the binary
depends on (DeepSpeed and torch versions, Python ABI, the op's C++ sources and flags, the compiler),
and each rank loads that file into DeepSpeed's own table of loaded ops before DeepSpeed asks for it:

    python tests/distributed/_ds_op.py     # tox's commands_pre: build into the cache unless there
    _ds_op.preload()                       # a rank, before deepspeed.init_distributed

The cache lives in ``$CALPLUG_CACHE_DIR/deepspeed-ops`` (default ``${XDG_CACHE_HOME:-~/.cache}/calplug``,
calplug's cache folder, where the demo keeps its stage-1 weights), beside pip's and uv's caches: a new ``CALPLUG_CACHE_DIR`` means a cold build (.ci/timing sets it
inside its ``--cache`` folder). Two runs that share the cache build under an ``flock`` (released
by the kernel when its holder dies, so a killed build never leaves a lock behind), each in a
private build folder; the finished file is moved into place whole. Without a cached file a rank
falls back to DeepSpeed's own JIT load, as before.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

NAME = "deepspeed_shm_comm"
CACHE_VARIABLE = "CALPLUG_CACHE_DIR"


def cache_root() -> Path:
    """``$CALPLUG_CACHE_DIR/deepspeed-ops``, else the user cache folder's ``calplug/deepspeed-ops``."""
    base = os.environ.get(CACHE_VARIABLE)
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "calplug")
    return Path(base) / "deepspeed-ops"


def _builder():
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    return ShareMemCommBuilder()


def _compiler_version() -> str:
    compiler = os.environ.get("CXX", "c++")
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"{compiler}: {type(error).__name__}"


def cache_key(builder=None) -> str:
    """What the built binary depends on, hashed: a change to any of it means another build."""
    import deepspeed
    import torch

    builder = builder or _builder()
    digest = hashlib.sha256()
    for part in (deepspeed.__version__, torch.__version__, str(torch.version.git_version),
                 sys.implementation.cache_tag, sysconfig.get_config_var("EXT_SUFFIX"), sys.platform,
                 repr(builder.strip_empty_entries(builder.cxx_args())),
                 repr(builder.strip_empty_entries(builder.extra_ldflags())), _compiler_version()):
        digest.update(str(part).encode() + b"\0")
    files = [Path(builder.deepspeed_src_path(p)) for p in builder.sources()]
    for folder in builder.include_paths():
        files += sorted(p for p in Path(builder.deepspeed_src_path(folder)).rglob("*") if p.is_file())
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"ds{deepspeed.__version__}-torch{torch.__version__}-{sys.implementation.cache_tag}-{digest.hexdigest()[:16]}"


def cached_file(key: str) -> Path:
    return cache_root() / key / f"{NAME}.so"


def build() -> Path:
    """The op's binary in the cache, built (under a lock) if it is not there yet."""
    import fcntl

    builder = _builder()
    key = cache_key(builder)
    target = cached_file(key)
    if target.is_file():
        print(f"calplug: DeepSpeed's {NAME} op from the cache: {target}", flush=True)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run building the same key: wait, then reuse
        if target.is_file():
            print(f"calplug: DeepSpeed's {NAME} op from the cache (built by another run): {target}", flush=True)
            return target
        for left in target.parent.glob("build-*"):  # a build killed midway (its lock died with it)
            shutil.rmtree(left, ignore_errors=True)
        build_dir = tempfile.mkdtemp(prefix="build-", dir=target.parent)
        try:
            os.environ["TORCH_EXTENSIONS_DIR"] = build_dir  # private: torch's own lock file lives here
            module = builder.jit_load(verbose=False)
            partial = target.with_suffix(f".{os.getpid()}.part")
            shutil.copy2(module.__file__, partial)
            os.replace(partial, target)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    print(f"calplug: built DeepSpeed's {NAME} op into the cache: {target}", flush=True)
    return target


def preload() -> Path | None:
    """Load the cached op into DeepSpeed's table of loaded ops; None (DeepSpeed JIT-loads) if absent."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    target = cached_file(cache_key())
    if not target.is_file() or NAME in OpBuilder._loaded_ops:
        return None
    spec = importlib.util.spec_from_file_location(NAME, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    OpBuilder._loaded_ops[NAME] = module
    return target


def main() -> None:
    """tox's commands_pre: the cached build, or (cache folder not writable) DeepSpeed's own JIT
    build into ``TORCH_EXTENSIONS_DIR``, which each rank then reloads as before."""
    try:
        build()
    except OSError as error:
        print(f"calplug: no cache for DeepSpeed's {NAME} op ({type(error).__name__}: {error}); "
              f"building it into TORCH_EXTENSIONS_DIR={os.environ.get('TORCH_EXTENSIONS_DIR')} "
              f"(set {CACHE_VARIABLE} to a writable folder to keep it across runs)", flush=True)
        _builder().load()


if __name__ == "__main__":
    main()
