"""Start-up: how long ``lrpc -h`` and ``lrpc check`` of the digits model take, each in a fresh
process (median of N), and the slowest imports of ``lrpc -h`` (``python -X importtime``).
Goals: ``lrpc -h`` ≤ 0.3 s, ``lrpc check`` of the digits model ≤ 1 s.

    python benchmarks/startup.py [--repeats 5] [--output BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

BEGIN, END = "<!-- lrpc-startup-bench:begin -->", "<!-- lrpc-startup-bench:end -->"
DIGITS = ROOT / "examples" / "digits" / "digits_cnn.onnx"
COMMANDS = {"lrpc -h": (["-h"], 0.3), "lrpc check digits_cnn.onnx": (["check", str(DIGITS)], 1.0)}


def seconds(arguments: list[str], repeats: int) -> float:
    """Median wall time of ``python -m lrpc.cli ARGUMENTS`` in fresh processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lrpc.cli", *arguments], cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def slowest_imports(arguments: list[str], top: int = 8) -> list[tuple[str, float]]:
    """``(module, cumulative ms)`` of the slowest top-level imports under ``-X importtime``."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "lrpc.cli", *arguments], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
        if cumulative.isdigit() and not name.startswith(" ") and "." not in name.strip():
            rows.append((name.strip(), int(cumulative) / 1000))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output")
    args = parser.parse_args(argv)

    import run

    rows = []
    for label, (arguments, goal) in COMMANDS.items():
        median = seconds(arguments, args.repeats)
        rows.append((label, median, goal))
        print(f"{label}: {median:.2f} s (goal ≤ {goal:g} s)")
    imports = slowest_imports(["-h"])
    print("slowest imports of lrpc -h:", ", ".join(f"{name} {ms:.0f} ms" for name, ms in imports))
    if args.output:
        info = run.machine_info(len(os.sched_getaffinity(0)))
        lines = [*run.section_head("Start-up", info),
                 f"- Median of {args.repeats} fresh processes (`python -m lrpc.cli ...`); command: "
                 "`python benchmarks/startup.py --output BENCHMARKS.md`", "",
                 "| command | seconds | goal | |", "| --- | ---: | ---: | --- |",
                 *[f"| `{label}` | {median:.2f} | ≤ {goal:g} | {'PASS' if median <= goal else 'FAIL'} |"
                   for label, median, goal in rows], "",
                 "Slowest top-level imports of `lrpc -h` (`python -X importtime`, cumulative): "
                 + ", ".join(f"{name} {ms:.0f} ms" for name, ms in imports) + "."]
        run.write_section(args.output, lines, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
