"""Start N ranks of tests/distributed/_worker.py (or another worker script) as subprocesses, with a timeout, so a hang or a
collective mismatch fails the test instead of blocking CI."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], out: Path, world: int = 2, timeout: float = 240.0,
           worker: Path = WORKER) -> dict:
    """Run the ranks of ``worker``; returns {"returncodes": [...], "logs": [...], "timed_out": bool}."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
        log = open(out / f"log{rank}.txt", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(worker), *args, "--out", str(out)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
    for log in logs:
        log.close()
    texts = [(out / f"log{r}.txt").read_text(errors="replace") for r in range(world)]
    return {"returncodes": [p.returncode for p in procs], "logs": texts, "timed_out": timed_out}


def describe(result: dict) -> str:
    tails = "\n".join(f"--- rank {r} (rc {rc}) ---\n{text[-3000:]}"
                      for r, (rc, text) in enumerate(zip(result["returncodes"], result["logs"])))
    return ("TIMED OUT\n" if result["timed_out"] else "") + tails


def launch_deepspeed(args: list[str], out: Path, world: int = 2, timeout: float = 240.0) -> dict:
    """The same ranks started by DeepSpeed's own launcher, as a user would:
    ``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 _worker.py ...``. One log (the launcher's)."""
    import signal

    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
           "--master_port", str(free_port()), str(WORKER), *args, "--out", str(out)]
    with open(out / "launcher.txt", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = (out / "launcher.txt").read_text(errors="replace")
    return {"returncodes": [proc.returncode], "logs": [text], "timed_out": timed_out}
