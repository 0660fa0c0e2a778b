#!/usr/bin/env python3
"""Profile the WhatsTracking server under load with py-spy (`pip install py-spy`).

    python bench/profile.py [--scenario pageview|click|webhook] [--database-url URL] [--seconds 15]

Starts a server on a fresh SQLite file (or the given DATABASE_URL, whose company `bench` must not
exist yet), drives it with wrk at 32 connections (bench/run.py's Lua scripts) while
`py-spy record --format raw` samples it, and prints the functions with the most samples: own time
(the frame on top of the stack) and total time (anywhere on the stack). The raw collapsed stacks
and an SVG flame graph are left in the work directory it prints.
"""

from __future__ import annotations

import argparse
import collections
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("pageview", "click", "webhook"),
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
        else:
            lua = run.lua_tracking(1, "pageview")
            if args.scenario == "click":
                wrk.run(port, lua, 3)
                lua = run.lua_tracking(2, "whatsapp_click", 1, 1000)
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
        subprocess.run(cmd, check=True, capture_output=True, timeout=args.seconds + 60)
        load.join(args.seconds + 120)
        print(f"load: {result.get('rps', 0):.0f} req/s, p50 {result.get('p50_us', 0) / 1000:.1f} "
              f"ms, p99 {result.get('p99_us', 0) / 1000:.1f} ms (py-spy sampling slows it)")
        summarise(collapsed, args.top)
        print(f"\nraw stacks: {collapsed}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
