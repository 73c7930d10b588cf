"""Command line: ``python -m course_lib course`` runs the course's main job."""

from __future__ import annotations

import argparse
import sys
import time

from course_lib.config import RESULTS_DIR, describe


def cmd_course(args: argparse.Namespace) -> int:
    from course_lib import demo

    print(f"Model Merging from Scratch - {describe()}")
    start = time.perf_counter()
    table = demo.run(seed=args.seed)
    text = demo.format_table(table)
    print("\nAccuracy (%) on the test split of each task:\n")
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "demo.md").write_text(text + "\n")
    print(f"\nwritten to {RESULTS_DIR / 'demo.md'} in {time.perf_counter() - start:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("course", help="merge real small models and print the results table")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_course)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
