"""Summarise one timed CI run (.ci/timing): per env, setup / commands_pre / test seconds, the pytest
counts, and peak disk. Reads only what every tox 4 prints, so an older tox.ini is timed the same way.

Where the numbers come from:
* tox's closing report, one line per env: ``py: OK (245.21=setup[20.12]+cmd[0.50,224.59] seconds)``.
  ``setup`` is the env's creation and its installs (deps and calplug); ``cmd`` lists each command's
  seconds in order, commands_pre first.
* The log lines ``<env>: commands_pre[i]>`` say how many of those commands are commands_pre: their
  seconds are counted as preparation (the --no-deps installs, the llava wheel download, DeepSpeed's
  op build), the rest as tests.
* Counts: pytest's closing line of each env (``1176 passed, 141 skipped, 265 deselected in ...``),
  else the env's junit file in .tox/results (no deselected count there).
* Disk: the sampler's rows ``time  .tox KiB  .tox+caches KiB`` (du counts a hard-linked file once).
"""
from __future__ import annotations

import argparse
import pathlib
import re
import xml.etree.ElementTree as ET

ANSI = re.compile(r"\x1b\[[0-9;]*m")
REPORT = re.compile(
    r"^\s+(?P<env>[\w.\-]+): (?P<msg>.+?) \((?P<total>[\d.]+)"
    r"(?:=setup\[(?P<setup>[\d.]+)\]\+cmd\[(?P<cmd>[\d.,]*)\])? seconds\)\s*$")
COMMAND = re.compile(r"^(?P<env>[\w.\-]+): (?P<kind>commands_pre|commands)\[(?P<i>\d+)\]> ")
COUNTS = re.compile(r"^=*\s*(?P<counts>\d+ (?:passed|failed|skipped|deselected|errors?|xfailed|xpassed)"
                    r"(?:, \d+ \w+)*) in [\d.]+s")
FINISH = re.compile(r"(congratulations :\)|evaluation failed :\() \((?P<seconds>[\d.]+) seconds\)")


def parse_log(text: str) -> tuple[dict, dict, dict, float | None]:
    reports, pre_count, counts = {}, {}, {}
    current, tox_seconds = None, None
    for raw in text.splitlines():
        line = ANSI.sub("", raw)
        if m := COMMAND.match(line):
            current = m["env"]
            if m["kind"] == "commands_pre":
                pre_count[current] = max(pre_count.get(current, 0), int(m["i"]) + 1)
        elif (m := COUNTS.match(line.strip())) and current is not None:
            counts[current] = m["counts"].replace(" warnings", "").strip()
        elif m := REPORT.match(line):
            cmd = [float(x) for x in m["cmd"].split(",") if x] if m["cmd"] else []
            reports[m["env"]] = {"status": m["msg"].split()[0], "total": float(m["total"]),
                                 "setup": float(m["setup"]) if m["setup"] else float(m["total"]), "cmd": cmd}
        elif m := FINISH.search(line):
            tox_seconds = float(m["seconds"])
    return reports, pre_count, counts, tox_seconds


def junit_counts(path: pathlib.Path) -> str | None:
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    parts = [f"{tests - failed - errors - skipped} passed"]
    parts += [f"{n} {word}" for n, word in ((failed, "failed"), (skipped, "skipped"), (errors, "errors")) if n]
    return ", ".join(parts) + " (junit)"


def peak_disk(path: pathlib.Path) -> tuple[float, float]:
    tox_kb = all_kb = 0
    if path.is_file():
        for row in path.read_text().splitlines():
            fields = row.split("\t")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                tox_kb, all_kb = max(tox_kb, int(fields[1])), max(all_kb, int(fields[2]))
    return tox_kb / 2**20, all_kb / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=pathlib.Path)
    ap.add_argument("disk", type=pathlib.Path)
    ap.add_argument("results", type=pathlib.Path, help=".tox/results of the run")
    ap.add_argument("--wall", type=float, required=True)
    ap.add_argument("--rc", type=int, default=0)
    ap.add_argument("--ref", default="?")
    ap.add_argument("--caches", default="?")
    ap.add_argument("--cpu", type=pathlib.Path, help="/usr/bin/time's output for the whole run")
    args = ap.parse_args()
    reports, pre_count, counts, tox_seconds = parse_log(args.log.read_text(errors="replace"))
    rows = [f"{'env':<16}{'status':>7}{'setup s':>9}{'pre s':>8}{'tests s':>9}{'total s':>9}  counts"]
    sums = [0.0, 0.0, 0.0]
    for env, r in reports.items():
        n_pre = pre_count.get(env, 0)
        pre, tests = sum(r["cmd"][:n_pre]), sum(r["cmd"][n_pre:])
        for i, value in enumerate((r["setup"], pre, tests)):
            sums[i] += value
        count = counts.get(env) or junit_counts(args.results / f"{env}.xml") or ""
        rows.append(f"{env:<16}{r['status']:>7}{r['setup']:>9.1f}{pre:>8.1f}{tests:>9.1f}{r['total']:>9.1f}  {count}")
    rows.append(f"{'sum of envs':<16}{'':>7}{sums[0]:>9.1f}{sums[1]:>8.1f}{sums[2]:>9.1f}{sum(sums):>9.1f}")
    tox_kb, all_gb = peak_disk(args.disk)
    print(f"ref {args.ref}, caches {args.caches}, exit {args.rc}")
    print("\n".join(rows))
    tox_part = f"tox itself {tox_seconds:.0f} s, " if tox_seconds is not None else ""
    print(f"wall {args.wall:.0f} s ({tox_part}the rest: tox install, chromium check, provisioning)")
    if args.cpu and args.cpu.is_file() and (m := re.search(r"cpu user ([\d.]+) s, sys ([\d.]+) s", args.cpu.read_text())):
        print(f"cpu {float(m[1]) + float(m[2]):.0f} s (user {m[1]}, sys {m[2]}): the run's own work, whatever else ran")
    print(f"peak disk: .tox {tox_kb:.2f} GiB; .tox + pip and uv caches {all_gb:.2f} GiB (sampled every 10 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
