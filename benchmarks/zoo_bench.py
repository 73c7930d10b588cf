"""Zoo benchmark: how long the mini zoo takes to build cold and to load, and its peak memory.

Builds the mini zoo of the course (the default ``ZooConfig``) from nothing into a fresh
temporary directory, so the cache in ``data/cache/`` is neither read nor touched, then loads it
``--loads`` times. Reported:

* the wall time of the whole build and of its stages, as the zoo's manifest records them (task
  data, the mini-CLIP's pretraining with its caption corpus, each expert's fine-tuning; experts
  train side by side in worker processes, so their seconds overlap and add up to more than the
  stage took);
* the peak memory of the build, this process and its worker processes together (a thread sums
  their proportional and resident set sizes every ``--interval`` s via psutil; GB = 10^9 bytes).
  Each sample reads ``/proc/<pid>/smaps_rollup``, which walks the page tables of a process of
  2 GB for about 20 ms while holding its memory-map lock. Measured on 55 pretraining steps
  (A/B in one sitting): sampled every 0.1 s (the first versions of this script) a process of
  the pretraining's own size ran 5% slower per step (median), one holding 2 GB more a third
  slower; every 1 s, 1% and 6-11%. Two cold builds took 569.1 s (0.1 s) and 565.9 s (1 s),
  within the noise. The default is 1 s;
* the time of ``load_zoo`` on the built zoo (best and every run).

Targets of the mini-world issue: build <= 8 minutes cold on the 2-core CPU, load <= 5 s, peak
RSS <= 4 GB. The machine is noisy (the same build has taken 451-647 s): compare within a run.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/zoo_bench.py            # the real zoo, ~8 min
    .venv/bin/python benchmarks/zoo_bench.py --small                     # a tiny zoo, seconds
    .venv/bin/python benchmarks/zoo_bench.py --workers 1                 # experts one by one

Writes ``benchmarks/zoo_results.md`` (not versioned) besides printing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from course_lib.models.vision import MiniClipConfig
from course_lib.models.zoo import ZooConfig, build_zoo, load_zoo
from course_lib.train import FinetuneConfig

GB = 1e9
SMALL = ZooConfig(
    clip=MiniClipConfig(
        corpus_size=512, epochs=1, width=32, text_width=32, layers=1, text_layers=1, heads=2,
        embed_dim=16, patch_size=8,
    ),
    finetune=FinetuneConfig(epochs=1, batch_size=32, warmup_steps=1),
    sizes=(("train", 64), ("val", 32), ("test", 32)),
)  # fmt: skip


class PeakMemory:
    """Samples the memory of this process plus its children every ``interval`` s.

    ``rss``: the largest sum of resident set sizes (an upper bound: pages of the shared libraries
    that every worker maps, torch's among them, count once per process); ``pss``: the largest
    sum of proportional set sizes (a shared page counts 1/n in each of the n processes that map
    it: what the processes together really occupy); ``own``: this process's largest RSS."""

    def __init__(self, interval: float = 1.0):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.rss = self.pss = self.own = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss = pss = 0
        for i, p in enumerate([self.proc, *self.proc.children(recursive=True)]):
            with contextlib.suppress(Exception):  # a worker that just exited
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
                if i == 0:
                    self.own = max(self.own, info.rss)
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--small", action="store_true", help="a tiny zoo (smoke run, seconds)")
    p.add_argument("--workers", type=int, default=None, help="experts at once (default: auto)")
    p.add_argument("--loads", type=int, default=3, help="how many times to time load_zoo")
    p.add_argument("--keep", type=Path, default=None, help="build here and keep it")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("zoo_results.md"))
    return p.parse_args(argv)


def report(
    cfg: ZooConfig, root: Path, wall: float, mem: PeakMemory, loads: list[float], args
) -> str:
    info = json.loads((root / "manifest.json").read_text())["info"]
    data = sum(v["seconds"] for k, v in info.items() if k.startswith("data_"))
    pretrain = info["clip.safetensors"]["seconds"]
    experts = {k[7:-12]: v for k, v in info.items() if k.startswith("expert_")}
    lines = [
        f"# Zoo benchmark ({datetime.date.today()}, {'small' if args.small else 'mini'} zoo)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, nproc {os.cpu_count()}, "
        f"workers {args.workers or 'auto'}, config {cfg.digest()}",
        "",
        "| what | seconds |",
        "|---|---:|",
        f"| **build, cold (wall)** | **{wall:.1f}** |",
        f"| task data ({len(cfg.task_names())} tasks) | {data:.1f} |",
        f"| mini-CLIP: caption corpus + contrastive pretraining | {pretrain:.1f} |",
        f"| experts, side by side (wall: build minus the stages above) | "
        f"{wall - data - pretrain:.1f} |",
    ]
    for name, v in experts.items():
        lines.append(
            f"| expert `{name}` (its own process; best val {max(v['val_accuracy']):.1f}%) | {v['seconds']:.1f} |"
        )
    lines += [
        f"| `load_zoo` of the built zoo, best of {len(loads)} | {min(loads):.2f} |",
        "",
        f"Peak memory of the build, this process and its workers together: {mem.pss / GB:.2f} GB "
        f"proportional set size (PSS), {mem.rss / GB:.2f} GB summed RSS (shared library pages "
        f"counted once per process); this process alone: {mem.own / GB:.2f} GB RSS; sampled "
        f"every {mem.interval:g} s. "
        f"`load_zoo` runs: {', '.join(f'{t:.2f}' for t in loads)} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = SMALL if args.small else ZooConfig()
    root = args.keep or Path(tempfile.mkdtemp(prefix="zoo_bench_"))
    if args.keep and root.exists():
        sys.exit(f"zoo_bench: {root} exists; the build must start from nothing")
    try:
        print(f"zoo_bench: building the {'small' if args.small else 'mini'} zoo cold in {root}")
        with PeakMemory(args.interval) as mem:
            t0 = time.perf_counter()
            build_zoo(cfg, root, workers=args.workers)
            wall = time.perf_counter() - t0
        loads = []
        for _ in range(args.loads):
            t0 = time.perf_counter()
            load_zoo("mini", cfg=cfg, root=root, build=False, progress=False)
            loads.append(time.perf_counter() - t0)
        text = report(cfg, root, wall, mem, loads, args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
