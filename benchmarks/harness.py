"""Shared benchmark plumbing: each measurement in its own subprocess, variants interleaved, medians reported."""

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable


def measure_interleaved(script: str, variants: list[str], repeats: int, threads: int, extra: list[str] = ()) -> dict:
    """Run `script --child VARIANT --threads N [extra]` `repeats` times per variant, alternating the order.

    The child prints one JSON dict of numbers as its last line; returns {variant: {metric: median}}.
    """
    runs = {variant: [] for variant in variants}
    for repeat in range(repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:
            out = subprocess.run(
                [sys.executable, script, "--child", variant, "--threads", str(threads), *extra],
                check=True,
                capture_output=True,
                text=True,
            )
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        variant: {metric: statistics.median(run[metric] for run in results) for metric in results[0]}
        for variant, results in runs.items()
    }


def run_benchmark(script: str, doc: str, measure: Callable[[str, int], dict], variants: list[str]):
    """Command line of a side-by-side benchmark: as a child, measure one variant; as the parent, return
    `(args, medians)` over interleaved child runs."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.threads)))
        raise SystemExit(0)
    return args, measure_interleaved(script, variants, args.repeats, args.threads)
