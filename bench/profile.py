#!/usr/bin/env python3
"""Profile the WhatsTracking server under load with py-spy (`pip install py-spy`).

    python bench/profile.py [--scenario pageview|click|webhook|match] [--database-url URL]
                            [--seconds 15]

Starts a server on a fresh SQLite file (or the given DATABASE_URL, whose company `bench` must not
exist yet), drives it with wrk at 32 connections (bench/run.py's Lua scripts) while
`py-spy record --format raw` samples it, and prints the functions with the most samples: own time
(the frame on top of the stack) and total time (anywhere on the stack), then how the machine's
CPU time went during the sampled seconds: the server process, Postgres' processes, wrk, and the
rest. `webhook` sends messages without a code, `match` messages whose code matches a seeded
visit. The raw collapsed stacks are left in the work directory it prints.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402


def summarise(collapsed: Path, top: int) -> None:
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    print(f"{samples} samples")
    for title, counter in (("own time", own), ("total time", total)):
        print(f"\n-- {title}")
        for frame, n in counter.most_common(top):
            print(f"{100 * n / samples:5.1f}%  {frame}")


def cpu_times() -> tuple[float, dict[int, tuple[str, float]]]:
    """(machine busy seconds, {pid: (command, seconds of CPU)}) from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    busy = (sum(map(int, fields)) - int(fields[3]) - int(fields[4])) / tick  # minus idle, iowait
    procs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2:].split()
        procs[int(entry.name)] = (name, (int(rest[11]) + int(rest[12])) / tick)
    return busy, procs


def print_cpu(before: tuple, after: tuple, server_pid: int) -> None:
    busy = after[0] - before[0]
    groups: collections.Counter = collections.Counter()
    for pid, (name, seconds) in after[1].items():
        used = seconds - before[1].get(pid, (name, 0.0))[1]
        group = ("server" if pid == server_pid else "postgres" if name.startswith("postgres")
                 else "wrk" if name == "wrk" else "py-spy" if name == "py-spy" else "other")
        groups[group] += used
    print(f"\n-- CPU while sampled: {busy:.1f} s busy of {os.cpu_count()} CPUs")
    for group, seconds in groups.most_common():
        print(f"{seconds:7.1f} s  {100 * seconds / busy:5.1f}%  {group}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("pageview", "click", "webhook", "match"),
                        default="pageview")
    parser.add_argument("--database-url")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--idle", action="store_true", help="include idle frames")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="wt-profile-"))
    url = args.database_url or f"sqlite:///{workdir / 'profile.db'}"
    company = run.company_add(url, workdir, {})
    port = run.free_port()
    server = run.Server("profiled", [sys.executable, str(run.WT)], run.wt_env(url, port, {}), port,
                        workdir)
    wrk_args = argparse.Namespace(wrk=shutil.which("wrk") or "wrk", connections=32)
    wrk = run.Wrk(wrk_args, workdir)
    try:
        if args.scenario == "webhook":
            lua = run.lua_webhook(1, company["webhook_secret"], None)
        elif args.scenario == "match":
            db = run.Db(url)
            codes = run.seed_codes(db, int((args.seconds + 4) * 8000))
            db.close()
            codes_file = workdir / "codes.txt"
            codes_file.write_text("\n".join(codes) + "\n")
            lua = run.lua_webhook(1, company["webhook_secret"], codes_file)
        else:
            lua = run.lua_tracking(1, "pageview")
            if args.scenario == "click":
                wrk.run(port, lua, 3)
                lua = run.lua_tracking(2, "whatsapp_click", 1, 1000)
        if url.startswith("postgres"):
            # as bench/run.py does: a warm-up, then the statistics autovacuum would have by now
            # (without them every lookup is planned as a walk through the company's rows)
            wrk.run(port, lua, 3)
            db = run.Db(url)
            db.execute("VACUUM ANALYZE")
            db.close()
        result: dict = {}
        load = threading.Thread(target=lambda: result.update(
            wrk.run(port, lua, args.seconds + 4)))
        load.start()
        collapsed = workdir / "profile.txt"
        cmd = ["py-spy", "record", "--pid", str(server.proc.pid), "--duration",
               str(int(args.seconds)), "--rate", "250", "--format", "raw", "-o", str(collapsed),
               "--threads"]
        if args.idle:
            cmd.append("--idle")
        subprocess.run(["sleep", "2"])
        before = cpu_times()
        subprocess.run(cmd, check=True, capture_output=True, timeout=args.seconds + 60)
        after = cpu_times()
        load.join(args.seconds + 120)
        print(f"load: {result.get('rps', 0):.0f} req/s, p50 {result.get('p50_us', 0) / 1000:.1f} "
              f"ms, p99 {result.get('p99_us', 0) / 1000:.1f} ms (py-spy sampling slows it)")
        summarise(collapsed, args.top)
        print_cpu(before, after, server.proc.pid)
        print(f"\nraw stacks: {collapsed}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
