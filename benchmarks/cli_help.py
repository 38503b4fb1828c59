"""Benchmark: how long `graphspace --help` takes (issue 16 asks for <= 1 s).

Run: `python benchmarks/cli_help.py [--repeats 5]`. Each repeat is a fresh interpreter running
the console script's entry point (`python -m graphspace.cli --help`), timed from start to exit;
the median and the minimum are printed, and whether torch was imported (it must not be).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "graphspace.cli", "--help"], check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    probe = ("import sys, contextlib, io\nfrom graphspace.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
             "print('torch' in sys.modules)")
    torch_loaded = subprocess.run([sys.executable, "-c", probe], check=True,
                                  capture_output=True, text=True).stdout.strip()
    print(f"graphspace --help: median {statistics.median(times):.3f} s, min {min(times):.3f} s "
          f"over {a.repeats} runs (torch imported: {torch_loaded})")


if __name__ == "__main__":
    main()
