"""The capstone leaderboard: every method of both tracks in one table, with what it costs.

The numbers come from the course's own runs: :func:`course_lib.experiments.run_all` for the
vision track and :func:`course_lib.llm_track.run_llm_all` for the LLM track. Each track's
result is kept as ``results/<profile>_<track>.json`` together with a *fingerprint*: the
profile, the world the numbers were measured on (zoo configuration, LoRA recipe, base model)
and a hash of ``course_lib``'s source code. A file is reused only when its fingerprint matches,
so changing one line of a merging method recomputes the numbers instead of serving stale ones.

Costs, per method, to serve *every* task of a track:

* ``stored``: parameters kept on disk, in units of one model (the vision encoder; the whole
  LLM). A merged model is 1; eight full experts are 8; LoRA experts are the base plus their
  A/B factors; Twin-Merging is the shared expert plus its compressed twin vectors and router.
* ``seconds``: wall time of that row in the run that produced it (merging, the lambda search
  on val, the router's training, the test evaluation), on the machine that ran it; evaluations
  read from the evaluation cache count at the time they took when computed.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from course_lib import config
from course_lib.eval import markdown, normalized, results_table
from course_lib.files import write_json
from course_lib.published import TWIN_VIT_B32_RERUNS, VIT_B32_SOURCE, vit_b32_table

TRACKS = ("vision", "llm")
REFERENCES = {"zero-shot", "base model", "experts", "LoRA experts"}  # not merges: bounds
PACKAGE = Path(__file__).resolve().parent
# Modules that draw, check exercises, export configs or parse the command line: they cannot
# change a number, so editing them does not invalidate saved results.
NOT_NUMERIC = ("__main__.py", "checks.py", "export.py", "files.py", "runtime.py", "viz.py")


@dataclass
class TrackResult:
    """One track's results, in the plain types that go to JSON."""

    track: str
    profile: str
    metric: str
    absolute: dict[str, dict[str, float]]  # method -> task -> score (%)
    experts: dict[str, float]
    chosen: dict[str, float]  # lambda picked on val, per tuned method
    seconds: dict[str, float]
    stored: dict[str, float]  # parameters stored, in units of one model
    notes: dict[str, float]
    fingerprint: str

    @property
    def tasks(self) -> list[str]:
        return list(self.experts)

    def normalized(self) -> dict[str, dict[str, float]]:
        """``100 * score / expert score`` per task (the Task Arithmetic paper's normalization)."""
        return {m: normalized(row, self.experts) for m, row in self.absolute.items()}

    def mean(self, method: str, *, norm: bool = False) -> float:
        row = self.normalized()[method] if norm else self.absolute[method]
        return sum(row.values()) / len(row)


# ----------------------------------------------------------------------------- fingerprints


def source_digest(root: Path = PACKAGE) -> str:
    """sha256 over the ``.py`` files of ``course_lib`` that compute numbers (path and bytes;
    :data:`NOT_NUMERIC` left out), first 16 hex digits."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).as_posix() in NOT_NUMERIC:
            continue
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def world_id(track: str, profile: str) -> str:
    """What the numbers were measured on, cheaply (no model is loaded)."""
    if track == "vision":
        from course_lib.models import hub, zoo

        return zoo.ZooConfig().digest() if profile == "mini" else f"{hub.FULL_MODEL}"
    if track == "llm":
        from course_lib.models import llm
        from course_lib.models.lora import LoraSpec

        return llm.world(LoraSpec())
    raise ValueError(f"track must be one of {TRACKS}, got {track!r}")


def world_of(zoo) -> str:
    """The world a loaded zoo's numbers are measured on (its ``world``, set by the loaders and
    equal to :func:`world_id` for the course's own zoo); ``"unknown"`` for a zoo made by hand."""
    return getattr(zoo, "world", "") or "unknown"


@functools.cache
def library_versions() -> str:
    """The libraries whose numerics the course's numbers depend on, with their versions (also
    part of the evaluation cache's key, :mod:`course_lib.evalcache`)."""
    from importlib.metadata import version

    import torch

    return f"torch {torch.__version__}, transformers {version('transformers')}"


def fingerprint(track: str, profile: str, world: str | None = None) -> str:
    """Track, profile, world (default: the course's, :func:`world_id`), code, and what computes:
    :func:`library_versions` and the device (a GPU gives the same numbers as the CPU only up to
    the last bits, which can move a result)."""
    world = world_id(track, profile) if world is None else world
    where = f"{library_versions()} on {config.device().type}"
    return f"{track}:{profile}:{world}:{source_digest()}:{where}"


def results_path(track: str, profile: str) -> Path:
    return config.RESULTS_DIR / f"{profile}_{track}.json"


# ----------------------------------------------------------------------------- records


def _numel(state) -> int:
    return sum(t.numel() for t in state.values() if t.is_floating_point())


def vision_record(res, zoo) -> TrackResult:
    """A :class:`TrackResult` from :func:`course_lib.experiments.run_all`'s ``Results``."""
    one = _numel(zoo.pretrained)
    stored = {m: 1.0 for m in res.absolute}
    stored["experts"] = float(len(zoo.task_names))
    notes = {}
    if res.twin is not None:
        tw = res.twin
        stored["Twin-Merging"] = 1.0 + (tw.stored_params + tw.router_params) / one
        notes = {
            "router accuracy (%)": tw.router_accuracy,
            "twin compression": tw.compression,
            "twin rank ratio": tw.rank_ratio,
        }
    return TrackResult(
        "vision", zoo.profile, "accuracy", res.absolute, res.experts, res.chosen,
        res.seconds, stored, notes, fingerprint("vision", zoo.profile, world_of(zoo)),
    )  # fmt: skip


def llm_record(res, zoo) -> TrackResult:
    """A :class:`TrackResult` from :func:`course_lib.llm_track.run_llm_all`'s ``LLMResults``."""
    one = sum(p.numel() for p in zoo.model.parameters())
    stored = {m: 1.0 for m in res.absolute}
    lora = sum(a.numel() + b.numel() for e in zoo.loras.values() for a, b in e.factors.values())
    stored["LoRA experts"] = 1.0 + lora / one
    notes = {}
    if res.twin is not None:
        twin_params = sum(c.stored_params for c in res.twin.compressed)
        router_params = sum(p.numel() for p in res.twin.router.parameters())
        stored["Twin-Merging"] = 1.0 + (twin_params + router_params) / one
        notes = {"twin compression": res.twin.compression}
        if res.twin_run is not None:
            notes["router accuracy (%)"] = res.twin_run.router_accuracy
    return TrackResult(
        "llm", zoo.profile, "exact match", res.absolute, res.experts, res.chosen,
        {k: round(v, 1) for k, v in res.seconds.items()}, stored, notes,
        fingerprint("llm", zoo.profile, world_of(zoo)),
    )  # fmt: skip


def save(record: TrackResult, path: Path | None = None) -> Path:
    """Write the record as JSON, atomically (a crash never leaves half a file)."""
    return write_json(path or results_path(record.track, record.profile), asdict(record), 1)


def load(path: Path, expected: str | None = None) -> TrackResult | None:
    """The record at ``path``, or None if missing, unreadable or its fingerprint differs."""
    try:
        record = TrackResult(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return record if expected is None or record.fingerprint == expected else None


def track_results(
    track: str,
    profile: str | None = None,
    *,
    recompute: bool = False,
    progress: bool = True,
    log: Callable[[str], object] | None = None,
    zoo=None,
) -> TrackResult:
    """The track's results: from ``results/`` when the fingerprint matches, else computed (and
    saved). Computing takes minutes on a CPU (vision ~2 min, LLM ~3 min once its experts are
    cached). ``log`` (e.g. ``print``) is told which of the two happens; ``zoo``, the track's
    zoo when the caller has already loaded it, is used instead of loading it again. Results of
    a zoo other than the course's (another config, task sizes, LoRA recipe) are computed and
    returned, but neither reused nor saved: ``results/`` holds the course's numbers only."""
    profile = profile or config.profile()
    if zoo is not None and zoo.profile != profile:
        raise ValueError(f"the zoo given is of profile {zoo.profile!r}, not {profile!r}")
    path = results_path(track, profile)
    ours = zoo is None or world_of(zoo) == world_id(track, profile)
    cached = load(path, fingerprint(track, profile)) if ours and not recompute else None
    if log is not None:
        what = (
            "computing (a few minutes)" if ours else "computing, not saved (not the course's zoo)"
        )
        log(f"{track} track: {'reused' if cached else what} {path.name}")
    if cached is not None:
        return cached
    config.seed_everything()
    if track == "vision":
        from course_lib import experiments
        from course_lib.models.zoo import load_zoo

        zoo = zoo if zoo is not None else load_zoo(profile)
        record = vision_record(experiments.run_all(zoo, progress=progress), zoo)
    elif track == "llm":
        from course_lib.llm_track import load_llm_zoo, run_llm_all

        zoo = zoo if zoo is not None else load_llm_zoo(profile, progress=progress)
        record = llm_record(run_llm_all(zoo, progress=progress), zoo)
    else:
        raise ValueError(f"track must be one of {TRACKS}, got {track!r}")
    if ours:
        save(record, path)
    return record


# ----------------------------------------------------------------------------- the board


def kind(track: str, method: str) -> str:
    """How a row serves its tasks."""
    if method in REFERENCES:
        return "reference"
    if method == "Twin-Merging":
        return "router + merge per input" if track == "vision" else "router + merge per group"
    return "one merged model"


def board(records: Sequence[TrackResult]) -> list[dict]:
    """One row per (track, method): means, costs; merges ranked by normalized mean."""
    rows = []
    for r in records:
        merges = sorted(
            (m for m in r.absolute if m not in REFERENCES),
            key=lambda m: -r.mean(m, norm=True),
        )
        rank = {m: i + 1 for i, m in enumerate(merges)}
        for m in r.absolute:
            rows.append(
                {
                    "track": r.track,
                    "rank": rank.get(m, "-"),
                    "method": m,
                    "kind": kind(r.track, m),
                    "mean (%)": r.mean(m),
                    "normalized (%)": r.mean(m, norm=True),
                    "stored (models)": r.stored[m],
                    "time (s)": r.seconds.get(m, float("nan")),
                }
            )
    return rows


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """The methods no other method beats on both costs and score.

    ``points[method] = (stored, score)``; ``a`` dominates ``b`` when ``a`` stores no more and
    scores no less, and is strictly better on one of the two. Returned in ``points`` order.
    """
    front = []
    for m, (cost, score) in points.items():
        dominated = any(
            c <= cost and s >= score and (c < cost or s > score)
            for other, (c, s) in points.items()
            if other != m
        )
        if not dominated:
            front.append(m)
    return front


def best_under_budget(rows: Sequence[Mapping], track: str, max_stored: float) -> str | None:
    """The merge (references excluded) of ``track`` with the best normalized mean among those
    that store at most ``max_stored`` models; None when none fits the budget."""
    fits = [
        r
        for r in rows
        if r["track"] == track and r["kind"] != "reference" and r["stored (models)"] <= max_stored
    ]
    return max(fits, key=lambda r: r["normalized (%)"])["method"] if fits else None


def _board_markdown(rows: Sequence[Mapping]) -> str:
    cols = list(rows[0])
    numeric = [isinstance(rows[0][c], float) for c in cols]
    out = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    for row in rows:
        cells = []
        for c in cols:
            v = row[c]
            if isinstance(v, float):
                v = f"{v:.2f}" if c == "stored (models)" else f"{v:.1f}"
            cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def published_comparison(vision: TrackResult | None) -> dict[str, dict[str, float]]:
    """Normalized mean per method: published ViT-B/32 next to our mini vision track."""
    pub = vit_b32_table()
    pub_norm = {m: normalized(row, pub["experts"]) for m, row in pub.items()}
    out = {}
    for m, row in pub_norm.items():
        out[m] = {"ViT-B/32 (published)": sum(row.values()) / len(row)}
        if vision is not None and m in vision.absolute:
            out[m]["mini (ours)"] = vision.mean(m, norm=True)
    if vision is not None and "Twin-Merging" in vision.absolute:
        out["Twin-Merging"] = {"mini (ours)": vision.mean("Twin-Merging", norm=True)}
    return out


def leaderboard_markdown(records: Sequence[TrackResult]) -> str:
    """The leaderboard as markdown: the board, per-task tables, the published comparison."""
    by_track = {r.track: r for r in records}
    lines = [
        "## Leaderboard",
        "",
        _board_markdown(board(records)),
        "",
        "mean: average score over the track's tasks (vision: top-1 accuracy on the test split; "
        "LLM: exact match). normalized: average of score / expert score. stored: parameters "
        "kept to serve every task, in units of one model. time: wall time of the row "
        "(merge, lambda search on val, router training, test evaluation) in the run that "
        "produced it, evaluations read from the cache at the time they took when computed. "
        "rank: merges only, by normalized mean.",
    ]
    for r in records:
        lines += [
            "",
            f"### {r.track}: normalized score per task (% of each expert), profile {r.profile}",
            "",
            markdown(results_table(r.normalized(), r.tasks)),
        ]
    comparison = published_comparison(by_track.get("vision"))
    cols = ["ViT-B/32 (published)", "mini (ours)"]
    lines += [
        "",
        "### Normalized mean (%): published CLIP ViT-B/32 vs our mini vision track",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|---:|---:|",
        *(
            f"| {m} | " + " | ".join(f"{v[c]:.1f}" if c in v else "-" for c in cols) + " |"
            for m, v in comparison.items()
        ),
        "",
        f"Source of the published column: {VIT_B32_SOURCE}. Twin-Merging's own ViT-B/32 table "
        "could not be retrieved; later papers re-ran it at "
        + ", ".join(f"{v:g}% ({k})" for k, v in TWIN_VIT_B32_RERUNS.items())
        + " absolute average (indicative only).",
    ]
    return "\n".join(lines)


def figures(records: Sequence[TrackResult], out_dir: Path) -> list[Path]:
    """Write the leaderboard figures (heatmap per track, radar per track, cost scatter)."""
    import matplotlib.pyplot as plt

    from course_lib import viz

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    def keep(fig, name: str) -> None:
        path = out_dir / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    for r in records:
        norm = r.normalized()
        keep(viz.method_heatmap(norm, f"{r.track}: normalized score (%)"), f"heatmap_{r.track}.png")
        merges = {m: v for m, v in norm.items() if m not in REFERENCES}
        keep(viz.radar(merges, f"{r.track}: normalized score per task (%)"), f"radar_{r.track}.png")
    points = {
        (r.track, m): (r.stored[m], r.mean(m, norm=True)) for r in records for m in r.absolute
    }
    keep(viz.cost_scatter(points), "costs.png")
    return paths
