"""How long `make demo` takes to build, from nothing to the point of serving.

    .venv/bin/python bench/demo_bench.py            # builds the demo in a temporary folder, once

Runs `python -m fine_tune.demo DIR --no-serve` (what `make demo` runs, without the server) in a
fresh folder and writes bench/results/demo.md: wall time, the machine's cores and its load average
when the build started (other work on the machine slows it down; the table says how busy it was).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "demo.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        load = os.getloadavg()
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fine_tune.demo", str(Path(folder) / "demo"), "--no-serve"],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
    lines = [
        "# The offline demo's build time",
        "",
        f"`.venv/bin/python bench/demo_bench.py` on {datetime.date.today()}, {os.cpu_count()} CPU cores, "
        f"{platform.python_implementation()} {platform.python_version()}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| draw 360 maps, load, train at 3 seeds, evaluate, register, store query encoders (wall) | {wall:.0f} s |",
        f"| load average (1 / 5 / 15 min) when the build started | {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} |",
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
