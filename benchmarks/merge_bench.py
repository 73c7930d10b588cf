"""Merge benchmark: time and peak memory of the course_lib merges on ViT-B/32-sized models.

Eight random "fine-tuned" state dicts shaped like CLIP ViT-B/32's vision tower (87.5M float32
parameters each, names and shapes from ``transformers.CLIPVisionConfig()``) plus a pretrained
one: pretrained ~ N(0, 0.02), fine-tuned = pretrained + N(0, 1e-3). The integer buffer
``embeddings.position_ids`` (non-persistent in transformers 5, so not in ``state_dict()``) is
added as in the model, to check that integer buffers pass through untouched.

Every method runs once, in this process, one after the other; between methods everything is
freed (``del`` + ``gc.collect()`` + ``malloc_trim``). For each we report the wall time and the
extra peak RSS: a background thread reads ``/proc/self/statm`` every 5 ms and we report the
peak minus the RSS just before the call (GB = 10^9 bytes). The baselines, which build the
[T x D] matrix, run last so that their memory cannot skew the other measurements:

* **official approach**: our own short re-implementation of the reference TIES code's approach
  (flatten every task into a [T x D] float matrix, per-row ``kthvalue`` threshold, sign
  election, disjoint mean, unflatten). It keeps ``k = max(1, floor(density * D))`` entries per
  task, like ``course_lib`` (the reference keeps ``int(density * D) + 1``), so its result must
  equal ``ties_merging(scope="global")``: this is asserted.
* **fusion-bench**: ``fusion_bench``'s own TIES helpers (``state_dict_to_vector``,
  ``ties_merging(K=20, merge_func="mean")``, ``vector_to_state_dict``). It keeps one extra entry
  per task, so it may differ from ours at a handful of positions (reported).

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/merge_bench.py            # full run, writes results.md
    .venv/bin/python benchmarks/merge_bench.py --small                     # quick smoke run
    .venv/bin/python benchmarks/merge_bench.py --only ties_global,official --models 4

The machine is noisy: compare numbers only within one run (one results table).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import io
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # compress() shows a progress bar; keep the log clean

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from course_lib.merging import (  # noqa: E402
    compress,
    pcb_merging,
    shared_expert,
    task_arithmetic,
    ties_merging,
    twin_vectors,
)

StateDict = dict[str, torch.Tensor]

DENSITY = 0.2  # TIES keep fraction (paper default)
TA_SCALING = 0.3
RANK_RATIO = 0.1
GB = 1e9

METHODS = ("task_arithmetic", "ties_global", "ties_tensor", "pcb", "twin")
BASELINES = ("official", "fusionbench")
ALL = METHODS + BASELINES


# -- memory ---------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(fd: int | None = None) -> int:
    """Resident set size of this process, from /proc/self/statm (second field, in pages)."""
    if fd is None:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    return int(os.pread(fd, 128, 0).split()[1]) * _PAGE


class PeakRSS:
    """Context manager: ``start`` (RSS on entry) and ``peak`` (max RSS sampled every 5 ms)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self._fd))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes(self._fd)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self._fd))
        os.close(self._fd)

    @property
    def extra_gb(self) -> float:
        return (self.peak - self.start) / GB


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def release() -> None:
    """Free what Python holds and give freed heap pages back to the OS."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# -- models ---------------------------------------------------------------------------------


def clip_config(small: bool):
    from transformers import CLIPVisionConfig

    if not small:
        return CLIPVisionConfig()  # defaults = ViT-B/32
    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )


def model_layout(small: bool) -> dict[str, tuple[torch.Size, torch.Tensor | None]]:
    """name -> (shape, value) of every tensor of CLIPVisionModel; value only for int buffers.

    Built on the meta device (no memory); integer buffers are rebuilt the way the model
    builds them (``position_ids = arange(num_positions)[None]``).
    """
    from transformers import CLIPVisionModel

    config = clip_config(small)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    layout: dict[str, tuple[torch.Size, torch.Tensor | None]] = {}
    for name, p in model.named_parameters():
        layout[name] = (p.shape, None)
    for name, b in model.named_buffers():
        if b.is_floating_point():
            layout[name] = (b.shape, None)
        elif name.endswith("position_ids"):
            layout[name] = (b.shape, torch.arange(b.shape[-1]).expand(b.shape).clone())
        else:
            raise RuntimeError(f"unexpected integer buffer {name} in CLIPVisionModel")
    return layout


def make_models(num: int, small: bool, seed: int = 0) -> tuple[StateDict, list[StateDict]]:
    """pretrained ~ N(0, 0.02); fine-tuned t = pretrained + N(0, 1e-3); int buffers copied."""
    gen = torch.Generator().manual_seed(seed)
    layout = model_layout(small)
    pre: StateDict = {}
    for name, (shape, value) in layout.items():
        pre[name] = (
            value.clone() if value is not None else torch.randn(shape, generator=gen).mul_(0.02)
        )
    fts = []
    for _ in range(num):
        ft: StateDict = {}
        for name, t in pre.items():
            if t.is_floating_point():
                ft[name] = torch.randn(t.shape, generator=gen).mul_(1e-3).add_(t)
            else:
                ft[name] = t.clone()
        fts.append(ft)
    return pre, fts


def float_numel(sd: StateDict) -> int:
    return sum(t.numel() for t in sd.values() if t.is_floating_point())


def state_bytes(sd: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


# -- baselines ------------------------------------------------------------------------------


def official_ties(
    pretrained: StateDict,
    finetuned: list[StateDict],
    density: float = DENSITY,
    scaling: float = 1.0,
) -> StateDict:
    """The reference TIES code's approach, written from scratch: everything as one [T, D] matrix.

    One difference on purpose: k = max(1, floor(density * D)) entries are kept per task, as in
    course_lib (the reference thresholds at kthvalue(D - int(density * D)) and keeps >=, i.e.
    one more entry per task), so that the two results can be compared exactly.
    """
    keys = [k for k, v in pretrained.items() if v.is_floating_point()]
    flat_ptm = torch.cat([pretrained[k].reshape(-1) for k in keys])
    flat_ft = torch.vstack([torch.cat([ft[k].reshape(-1) for k in keys]) for ft in finetuned])
    tv = flat_ft - flat_ptm  # [T, D]
    d = tv.shape[1]
    k = max(1, math.floor(density * d + 1e-9))
    kth = tv.abs().kthvalue(d - k + 1, dim=1, keepdim=True).values  # k-th largest |tau_t|
    trimmed = tv * (tv.abs() >= kth)
    sign = trimmed.sum(dim=0).sign()
    sign[sign == 0] = sign.sum().sign()  # "majority" rule for zero sums
    selected = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
    merged_tv = selected.sum(dim=0) / (selected != 0).sum(dim=0).clamp(min=1)
    merged = flat_ptm + scaling * merged_tv
    out: StateDict = {}
    offset = 0
    for name, t in pretrained.items():
        if name in keys:
            out[name] = merged[offset : offset + t.numel()].view_as(t)
            offset += t.numel()
        else:
            out[name] = t.clone()
    return out


def fusionbench_ties(
    pretrained: StateDict, finetuned: list[StateDict], density: float = DENSITY
) -> StateDict:
    """fusion-bench's TIES (TiesMergingAlgorithm.run's 'merging models' step), K = 20, mean."""
    from fusion_bench.method.ties_merging.ties_merging_utils import (
        state_dict_to_vector,
        vector_to_state_dict,
    )
    from fusion_bench.method.ties_merging.ties_merging_utils import (
        ties_merging as fb_ties_merging,
    )

    remove = [k for k, v in pretrained.items() if not v.is_floating_point()]
    flat_ft = torch.vstack([state_dict_to_vector(ft, remove) for ft in finetuned])
    flat_ptm = state_dict_to_vector(pretrained, remove)
    tv = flat_ft - flat_ptm
    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress lines
        merged_tv = fb_ties_merging(tv, reset_thresh=100 * density, merge_func="mean")
    merged = flat_ptm + 1.0 * merged_tv
    sd = dict(vector_to_state_dict(merged, pretrained, remove))
    for k in remove:
        sd[k] = pretrained[k].clone()
    return {k: sd[k] for k in pretrained}


# -- benchmark ------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    seconds: float  # the best of ``times``
    extra_gb: float  # the largest over the repeats
    note: str = ""
    times: tuple[float, ...] = ()


REPEAT = 1  # set from --repeat


def measure(rows: list[Row], name: str, fn: Callable[[], object], note: str = ""):
    """Run ``fn`` REPEAT times (freeing the previous result first); keep the best time."""
    times, extra, out = [], 0.0, None
    for i in range(REPEAT):
        out = None  # the previous repeat's result must not count as this one's memory
        release()
        print(f"  running {name}{f' ({i + 1}/{REPEAT})' if REPEAT > 1 else ''} ...", flush=True)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
        times.append(seconds)
        extra = max(extra, mem.extra_gb)
        print(f"  {name}: {seconds:.2f} s, +{mem.extra_gb:.2f} GB peak RSS", flush=True)
    rows.append(Row(name, min(times), extra, note, tuple(times)))
    return out


def check_same(ours: StateDict, ref: StateDict, what: str) -> str:
    """Assert allclose on every tensor; return a one-line summary."""
    max_diff, differing, total = 0.0, 0, 0
    for k, a in ours.items():
        b = ref[k]
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {k} shape/dtype differ"
        if not a.is_floating_point():
            assert torch.equal(a, b), f"{what}: integer buffer {k} differs"
            continue
        close = torch.isclose(a, b, rtol=1e-5, atol=1e-7)
        differing += int((~close).sum())
        total += a.numel()
        max_diff = max(max_diff, float((a - b).abs().max()))
    assert differing == 0, (
        f"{what}: {differing} of {total} entries differ (max |diff| {max_diff:.3g})"
    )
    return f"{what}: allclose on all {total:,} entries (max |diff| {max_diff:.3g})"


def count_diff(ours: StateDict, ref: StateDict) -> tuple[int, int, float]:
    differing, total, max_diff = 0, 0, 0.0
    for k, a in ours.items():
        if not a.is_floating_point():
            continue
        b = ref[k]
        differing += int((~torch.isclose(a, b, rtol=1e-5, atol=1e-7)).sum())
        total += a.numel()
        max_diff = max(max_diff, float((a - b).abs().max()))
    return differing, total, max_diff


def table(rows: list[Row]) -> str:
    official = next((r.seconds for r in rows if r.name.startswith("official")), None)
    repeats = max(len(r.times) for r in rows) if rows else 1
    best = f"best of {repeats} " if repeats > 1 else ""
    lines = [
        f"| method | time (s), {best}| extra peak RSS (GB) | speed-up vs official-approach TIES |"
        + (" every run (s) |" if repeats > 1 else ""),
        "|---|---:|---:|---:|" + ("---|" if repeats > 1 else ""),
    ]
    for r in rows:
        speed = "n/a"
        if official:
            x = official / r.seconds
            speed = f"{x:.0f}x" if x >= 10 else f"{x:.1f}x" if x >= 1 else f"{x:.2f}x"
        name = f"{r.name} ({r.note})" if r.note else r.name
        every = f" {', '.join(f'{t:.2f}' for t in r.times)} |" if repeats > 1 else ""
        lines.append(f"| {name} | {r.seconds:.2f} | {r.extra_gb:.2f} | {speed} |{every}")
    return "\n".join(lines)


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def mem_total_gb() -> float:
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                return int(line.split()[1]) * 1024 / GB
    return float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=8, help="number of fine-tuned models (default 8)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of: {','.join(ALL)}")
    ap.add_argument("--skip-baselines", action="store_true", help="do not run official/fusionbench")
    ap.add_argument("--small", action="store_true", help="tiny CLIP config (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every method this many times and report the best time (default 1)",
    )
    ap.add_argument(
        "--output",
        default=None,
        help="markdown file for the table (default benchmarks/results.md for a full run, "
        "none for --small; '-' for none)",
    )
    args = ap.parse_args(argv)
    if args.models < 1:
        ap.error("--models must be >= 1")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    selected = (
        list(ALL) if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    )
    unknown = [s for s in selected if s not in ALL]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {','.join(ALL)}")
    if args.skip_baselines:
        selected = [s for s in selected if s not in BASELINES]
    args.selected = [s for s in ALL if s in selected]  # canonical order: baselines last
    return args


def main(argv: list[str] | None = None) -> int:
    global REPEAT
    args = parse_args(argv)
    REPEAT = args.repeat
    t_start = time.perf_counter()
    sel = set(args.selected)
    print(
        f"merge_bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"nproc {os.cpu_count()}, methods {','.join(args.selected)}",
        flush=True,
    )

    t0 = time.perf_counter()
    pre, fts = make_models(args.models, args.small, args.seed)
    n_params = float_numel(pre)
    model_gb = state_bytes(pre) / GB
    print(
        f"built {args.models} fine-tuned + 1 pretrained models of {n_params:,} float params "
        f"({model_gb:.3f} GB each) in {time.perf_counter() - t0:.1f} s; RSS {rss_bytes() / GB:.2f} GB",
        flush=True,
    )

    rows: list[Row] = []
    notes: list[str] = []
    ours_global: StateDict | None = None

    if "task_arithmetic" in sel:
        out = measure(
            rows, "task_arithmetic", lambda: task_arithmetic(pre, fts, TA_SCALING), "lambda 0.3"
        )
        del out
    if "ties_global" in sel:
        ours_global = measure(
            rows,
            'ties_merging scope="global"',
            lambda: ties_merging(pre, fts, density=DENSITY, scope="global"),
            "density 0.2, dis-mean",
        )
    if "ties_tensor" in sel:
        out = measure(
            rows,
            'ties_merging scope="tensor"',
            lambda: ties_merging(pre, fts, density=DENSITY, scope="tensor"),
            "density 0.2, dis-mean",
        )
        del out
    if "pcb" in sel:
        out = measure(rows, "pcb_merging", lambda: pcb_merging(pre, fts), "defaults")
        del out
    if "twin" in sel:
        shared = measure(
            rows, "twin: shared_expert", lambda: shared_expert(pre, fts), "TA lambda 0.3"
        )
        vectors = measure(rows, "twin: twin_vectors", lambda: twin_vectors(shared, fts))
        compressed = measure(
            rows,
            "twin: compress",
            lambda: compress(vectors, rank_ratio=RANK_RATIO),
            f"rank_ratio {RANK_RATIO}, {len(vectors)} vectors",
        )
        notes.append(
            f"twin compress: stored/dense parameters = {compressed[0].compression:.3f} per vector"
        )
        del shared, vectors, compressed

    if "official" in sel:
        ref = measure(
            rows,
            "official-approach TIES",
            lambda: official_ties(pre, fts),
            "[T x D] kthvalue, same k as ours",
        )
        if ours_global is not None:
            notes.append(
                check_same(ours_global, ref, 'ties_merging(scope="global") vs official approach')
            )
            print("  " + notes[-1], flush=True)
        del ref
    if "fusionbench" in sel:
        release()
        import fusion_bench.method.ties_merging.ties_merging_utils  # noqa: F401  (import outside timing)

        ref = measure(
            rows, "fusion-bench ties_merging", lambda: fusionbench_ties(pre, fts), "K=20, mean"
        )
        if ours_global is not None:
            differing, total, max_diff = count_diff(ours_global, ref)
            notes.append(
                f'ties_merging(scope="global") vs fusion-bench: {differing} of {total:,} entries differ '
                f"(max |diff| {max_diff:.3g}); fusion-bench keeps int(0.2*D)+1 entries per task, we keep "
                "floor(0.2*D)"
            )
            print("  " + notes[-1], flush=True)
            assert differing <= 16 * args.models, (
                "fusion-bench differs at more than a handful of positions"
            )
        del ref
    del ours_global
    release()

    total_s = time.perf_counter() - t_start
    md = table(rows)
    print()
    print(md)
    print(f"\nwhole run: {total_s:.1f} s", flush=True)
    for n in notes:
        print(f"- {n}")

    output = args.output
    if output is None:
        output = "-" if args.small else str(ROOT / "benchmarks" / "results.md")
    if output != "-":
        header = [
            "# Merge benchmark",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- machine: {cpu_model()}, nproc {os.cpu_count()}, {mem_total_gb():.1f} GB RAM, "
            f"{platform.system()} {platform.release()}",
            f"- torch {torch.__version__} ({torch.get_num_threads()} threads), Python "
            f"{platform.python_version()}",
            f"- command: `{' '.join(['benchmarks/merge_bench.py', *sys.argv[1:]])}`",
            f"- models: {args.models} fine-tuned + 1 pretrained, CLIP ViT-B/32 vision tower shapes"
            f"{' (--small config)' if args.small else ''}, {n_params:,} float32 params "
            f"= {model_gb:.3f} GB per model; pretrained ~ N(0, 0.02), fine-tuned = pretrained + "
            "N(0, 1e-3)",
            "- **one run**: all numbers below come from the same process, methods run one after "
            "the other (baselines last). The machine is noisy (the same job can be 3-9x slower "
            "between runs); compare rows within this table only."
            + (
                f" Every method ran {args.repeat} times in a row; the time is the best of them "
                "(every run is listed), the memory the largest."
                if args.repeat > 1
                else ""
            ),
            "- extra peak RSS: peak RSS (sampled every 5 ms from /proc/self/statm) minus the RSS "
            "just before the call, GB = 10^9 bytes; includes the merged output.",
            f"- whole run (model generation, all methods, checks): {total_s:.1f} s",
            "",
            md,
            "",
        ]
        header += [f"- {n}" for n in notes]
        Path(output).write_text("\n".join(header) + "\n")
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
