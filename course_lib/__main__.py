"""Command line.

* ``python -m course_lib zoo``    - build (or verify and repair) the model zoo of the profile;
* ``python -m course_lib course`` - the course's main job: the zoo, then every method on it
  (or their saved results, when neither the code nor the zoo changed since), printed as
  absolute and normalized accuracy tables and written to ``results/``;
* ``python -m course_lib llm``    - the LLM track: SmolLM2, four LoRA experts (trained once,
  cached), every method, written to ``results/<profile>_llm_results.md``;
* ``python -m course_lib leaderboard`` - both tracks in one table with each method's costs,
  written to ``results/leaderboard.md`` and ``results/figures/`` (a track whose saved results
  no longer match the code or the world is recomputed first).

``course`` and ``llm`` also save their numbers as ``results/<profile>_<track>.json``, which the
leaderboard and notebook 07 reuse (:mod:`course_lib.leaderboard`).
"""

from __future__ import annotations

import argparse
import sys
import time

from course_lib.config import RESULTS_DIR, describe, profile, seed_everything


def cmd_zoo(args: argparse.Namespace) -> int:
    from course_lib.models import zoo

    print(f"Model Merging from Scratch - {describe()}")
    start = time.perf_counter()
    if profile() == "mini":
        root = zoo.build_zoo()
        bad = zoo.verify_zoo(root)
        print(f"mini zoo ready in {root} ({time.perf_counter() - start:.0f} s); corrupted: {bad}")
    else:
        zoo.load_zoo("full")
        print(f"full zoo loaded in {time.perf_counter() - start:.0f} s")
    return 0


def results_markdown(record, neg) -> str:
    """The README/results tables of the vision track (a ``leaderboard.TrackResult``): absolute
    and normalized accuracy, the lambdas chosen, Twin-Merging's costs, the negation."""
    from course_lib.eval import markdown, results_table

    tasks = record.tasks
    absolute = results_table(record.absolute, tasks)
    merges = {k: v for k, v in record.absolute.items() if k != "zero-shot"}
    norm = results_table(merges, tasks, normalize_by=record.experts)
    chosen = ", ".join(f"{k} λ={v:g}" for k, v in record.chosen.items())
    notes = record.notes
    others = [t for t in tasks if t != neg.task]
    worst = max(neg.zeroshot[t] - neg.negated[t] for t in others)
    return "\n".join(
        [
            "### Absolute accuracy (%), test split",
            "",
            markdown(absolute),
            "",
            "### Normalized accuracy (% of each task's expert)",
            "",
            markdown(norm),
            "",
            f"λ chosen on the validation split: {chosen}. Twin-Merging: shared expert = task "
            f"arithmetic λ=0.3, twin vectors SVD-compressed to rank ratio "
            f"{notes['twin rank ratio']:g} (stored/dense parameters "
            f"{notes['twin compression']:.3f}), router accuracy "
            f"{notes['router accuracy (%)']:.1f}% on the test inputs, weights merged per input.",
            "",
            f"Negation: θ0 − {neg.scaling:g}·τ_{neg.task} takes {neg.task} from "
            f"{neg.zeroshot[neg.task]:.1f}% to {neg.negated[neg.task]:.1f}%; the largest drop on "
            f"another task is {worst:.1f} points."
            + (
                ""
                if neg.within_tolerance
                else f" No λ tried kept every other task within {neg.tolerance:g} points of θ0 "
                "on the validation split: this is the smallest."
            ),
        ]
    )


def cmd_course(args: argparse.Namespace) -> int:
    from course_lib import experiments, leaderboard
    from course_lib.models.zoo import load_zoo

    print(f"Model Merging from Scratch - {describe()}")
    start = time.perf_counter()
    seed_everything(args.seed)
    zoo = load_zoo()
    print(f"zoo ready ({time.perf_counter() - start:.0f} s)")
    # every method on the zoo; reused from results/ when the code and the zoo are unchanged
    record = leaderboard.track_results("vision", zoo.profile, log=print, zoo=zoo)
    neg = experiments.negation(zoo, args.negate or zoo.task_names[-1])
    return _report(results_markdown(record, neg), f"{zoo.profile}_results.md", start)


def _report(text: str, name: str, start: float) -> int:
    """Print the tables and write them to results/<name>."""
    print("\n" + text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / name
    out.write_text(text + "\n")
    print(f"\nwritten to {out} in {time.perf_counter() - start:.0f} s")
    from course_lib import evalcache

    if evalcache.hits():
        print(
            f"{evalcache.hits()} results (accuracies; Twin's router features, compressed vectors "
            "and answers) were read from "
            f"{evalcache.root()} (same weights, data and code; computing them took "
            f"{evalcache.seconds_saved():.0f} s; COURSE_EVAL_CACHE=off computes them again)"
        )
    return 0


def cmd_llm(args: argparse.Namespace) -> int:
    from course_lib import leaderboard
    from course_lib.llm_track import llm_results_markdown, load_llm_zoo, run_llm_all

    print(f"Model Merging from Scratch, LLM track - {describe()}")
    start = time.perf_counter()
    seed_everything(args.seed)
    zoo = load_llm_zoo()
    print(f"base model and LoRA experts ready ({time.perf_counter() - start:.0f} s); merging ...")
    res = run_llm_all(zoo)
    leaderboard.save(leaderboard.llm_record(res, zoo))
    return _report(llm_results_markdown(res), f"{zoo.profile}_llm_results.md", start)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from course_lib import leaderboard

    print(f"Model Merging from Scratch, leaderboard - {describe()}")
    start = time.perf_counter()
    records = [
        leaderboard.track_results(track, recompute=args.recompute, log=print)
        for track in leaderboard.TRACKS
    ]
    paths = leaderboard.figures(records, RESULTS_DIR / "figures")
    print("figures: " + ", ".join(str(p.relative_to(RESULTS_DIR)) for p in paths))
    return _report(leaderboard.leaderboard_markdown(records), "leaderboard.md", start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("zoo", help="build or repair the model zoo of the active profile")
    p.set_defaults(func=cmd_zoo)
    p = sub.add_parser("course", help="the zoo, every merging method, the results tables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negate", default=None, help="task to forget in the negation experiment")
    p.set_defaults(func=cmd_course)
    p = sub.add_parser("llm", help="the LLM track: SmolLM2 LoRA experts and every method")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_llm)
    p = sub.add_parser("leaderboard", help="both tracks, every method, scores and costs")
    p.add_argument("--recompute", action="store_true", help="ignore the saved results/*.json")
    p.set_defaults(func=cmd_leaderboard)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
