"""Try another fine-tuning recipe for the mini world's experts, and see what merging makes of it.

The static merges of the mini world stay near zero-shot (README, "Results of `make course`"):
the eight task vectors of so small an encoder interfere. This tool is for whoever wants to take
that question further. It fine-tunes the eight experts again from the zoo's theta_0 with a
changed recipe, side by side in worker processes as the zoo does, and prints on the validation
split (the first ``VAL_LIMIT`` examples of each task, as every lambda search of the course):
zero-shot, each expert, ||tau|| / ||theta_0||, weight averaging and the lambda curves of task
arithmetic, TIES and PCB, each merge evaluated with the frozen zero-shot heads, and how much the
experts disturb each other's predictions (the disentanglement error xi(1, 1) of notebook 02, its
min, mean and max over the pairs). The built zoo in
``data/cache/mini`` is only read; the trial's experts go to ``--out`` (a rerun resumes there).

    python tools/expert_recipes.py --out /tmp/trial                    # the zoo's own recipe
    python tools/expert_recipes.py --out /tmp/lr1e-3 lr=1e-3 batch_size=32
    python tools/expert_recipes.py --out /tmp/scale100 --head-scale 100
    python tools/expert_recipes.py --out /tmp/frozen --freeze embeddings lr=1e-3
    python tools/expert_recipes.py --out /tmp/linear --linearized

``key=value`` changes a field of :class:`course_lib.train.FinetuneConfig` (the zoo's recipe,
read from its manifest, is the starting point). ``--head-scale`` is
the logit scale the head is *trained* with (evaluation takes the argmax, which no scale
changes); ``--freeze REGEX`` keeps the matching encoder parameters at theta_0;
``--linearized`` fine-tunes the encoder's first-order Taylor expansion around theta_0 instead of
the encoder (Ortiz-Jimenez et al., NeurIPS 2023, Sec. 5; :mod:`course_lib.models.linearized`),
and every merge is then evaluated through that expansion too. With no option the experts are
the zoo's, bit for bit (tested).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from course_lib.analysis import disentanglement_matrix, zoo_predictor
from course_lib.config import progress_bar
from course_lib.experiments import LAMBDAS_TA, LAMBDAS_TIES, VAL_LIMIT, mean
from course_lib.files import save_tensors, write_json
from course_lib.merging import pcb_merging, task_arithmetic, ties_merging, weight_average
from course_lib.models import hub
from course_lib.models import zoo as zoo_mod
from course_lib.models.linearized import Linearized
from course_lib.models.vision import MiniClipConfig, ZeroShotClassifier
from course_lib.models.zoo import ZooConfig
from course_lib.state import task_vector
from course_lib.train import FinetuneConfig, finetune


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the trial's experts are fine-tuned: the zoo's recipe with some changes."""

    finetune: FinetuneConfig = FinetuneConfig()  # main() starts from the zoo's own
    head_scale: float | None = None  # None: the zoo's (the pretrained CLIP's logit scale)
    freeze: str | None = None  # regex over encoder parameter names kept at theta_0
    linearized: bool = False  # fine-tune (and evaluate) f(x; theta_0) + J(x) (theta - theta_0)

    def __post_init__(self):
        if self.head_scale is not None and not self.head_scale > 0:
            raise ValueError(f"head_scale must be > 0, got {self.head_scale!r}")
        if self.freeze is not None:
            re.compile(self.freeze)  # a malformed regex fails here, not in a worker

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_overrides(items: Sequence[str]) -> dict[str, object]:
    """``["lr=1e-3", "epochs=3"]`` -> ``{"lr": 0.001, "epochs": 3}``, typed like the fields of
    :class:`FinetuneConfig`; an unknown field or a malformed item raises ``ValueError``."""
    defaults = FinetuneConfig().to_dict()
    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"{item!r}: expected key=value with key one of {sorted(defaults)}")
        kind = int if isinstance(defaults[key], int) or defaults[key] is None else float
        try:
            out[key] = None if raw.lower() == "none" else kind(raw)
        except ValueError:
            raise ValueError(f"{item!r}: {key} takes {kind.__name__} values") from None
    return out


def zoo_config(root: Path) -> ZooConfig:
    """The configuration the zoo in ``root`` was built with, read from its manifest (its digest
    is checked): the trial starts from that zoo's fine-tuning recipe, not from the defaults."""
    manifest = root / "manifest.json"
    if not manifest.exists():
        raise FileNotFoundError(f"no built zoo in {root}: run `make zoo` first")
    data = json.loads(manifest.read_text())
    c = data["config"]
    cfg = ZooConfig(
        clip=MiniClipConfig(**c["clip"]),
        finetune=FinetuneConfig(**c["finetune"]),
        sizes=tuple(c["sizes"].items()),
        tasks=tuple(c["tasks"]),
        data_seed=c["data_seed"],
    )
    if cfg.digest() != data["config_hash"]:
        raise ValueError(f"{manifest}: its config does not hash to its config_hash")
    return cfg


def train_expert(root: Path, name: str, recipe: Recipe) -> tuple[str, dict, list, float]:
    """Fine-tune the expert of ``name`` from the zoo in ``root`` with ``recipe``; return its
    name, encoder state, validation accuracy per epoch and seconds."""
    t0 = time.perf_counter()
    clip, _ = zoo_mod._load_mini_clip(root)
    head = load_file(str(root / "heads.safetensors"))[name]
    encoder = hub.build_image_encoder(hub.encoder_config(clip), hub.image_encoder_state(clip))
    if recipe.freeze:
        frozen = [p for k, p in encoder.named_parameters() if re.search(recipe.freeze, k)]
        if not frozen:
            names = [k for k, _ in encoder.named_parameters()]
            raise ValueError(f"--freeze {recipe.freeze!r} matches no encoder parameter: {names}")
        for p in frozen:
            p.requires_grad_(False)
    if recipe.linearized:
        encoder = Linearized(encoder)
    scale = recipe.head_scale or zoo_mod._head_scale(clip)
    model = ZeroShotClassifier(encoder, head, scale)
    task = zoo_mod._load_task(root, name)
    state, hist = finetune(model, task, recipe.finetune, progress=False)
    return name, state, hist.val_accuracy, time.perf_counter() - t0


def train_experts(
    root: Path, out: Path, names: Sequence[str], recipe: Recipe, workers: int
) -> Iterator[tuple[str, list, float]]:
    """Train the experts missing from ``out``, ``workers`` at a time; save each as it comes.

    ``out/recipe.json`` records the recipe and the zoo: a rerun with the same ones resumes, one
    with another recipe or zoo is refused (its experts would be mixed with the old ones)."""
    claim = {"recipe": recipe.to_dict(), "zoo": zoo_config(root).digest()}
    record = out / "recipe.json"
    if record.exists() and json.loads(record.read_text()) != claim:
        raise ValueError(
            f"{out} holds experts of another recipe or zoo ({record.read_text().strip()}); "
            "choose another --out"
        )
    write_json(record, claim, indent=1, sort_keys=True)
    todo = [n for n in names if not (out / f"expert_{n}.safetensors").exists()]
    job = functools.partial(train_expert, root, recipe=recipe)
    if workers <= 1 or len(todo) <= 1:
        results = map(job, todo)
        yield from _save(out, results)
        return
    yield from _save(out, zoo_mod.imap_in_workers(job, todo, min(workers, len(todo))))


def _save(out: Path, results) -> Iterator[tuple[str, list, float]]:
    for name, state, val, seconds in results:
        save_tensors(out / f"expert_{name}.safetensors", state)
        yield name, val, seconds


def relative_norm(pre: dict[str, Tensor], expert: dict[str, Tensor]) -> float:
    """||theta_t - theta_0|| / ||theta_0|| over the encoder's floating-point tensors."""
    weights = {k: v for k, v in pre.items() if v.is_floating_point()}
    num = sum(float(((expert[k] - v) ** 2).sum()) for k, v in weights.items())
    den = sum(float((v**2).sum()) for v in weights.values())
    return (num / den) ** 0.5


def report(zoo: zoo_mod.Zoo, limit: int = VAL_LIMIT, progress: bool = True) -> dict[str, object]:
    """Validation means (%) of zero-shot, the experts, averaging and every lambda of TA, TIES
    and PCB for the experts in ``zoo`` (the course's grids and defaults), and how entangled the
    experts are: the disentanglement error xi(1, 1) over every pair (notebook 02; 0 to 2)."""
    pre, fts = zoo.pretrained, zoo.finetuned()
    steps = 4 + len(LAMBDAS_TA) + 2 * len(LAMBDAS_TIES)
    bar = progress_bar(total=steps, desc="evaluate", progress=progress)

    def val(state) -> float:
        bar.update()
        return round(mean(zoo.evaluate(state, "val", limit=limit)), 1)

    experts = {t: zoo.evaluate(zoo.experts[t], "val", [t], limit=limit)[t] for t in zoo.tasks}
    bar.update()
    out = {
        "zero-shot": val(pre),
        "experts": round(mean(experts), 1),
        "per expert": {t: round(a, 1) for t, a in experts.items()},
        "tau/theta0": round(mean({t: relative_norm(pre, e) for t, e in zoo.experts.items()}), 3),
        "weight averaging": val(weight_average(fts)),
        "task arithmetic": {lam: val(task_arithmetic(pre, fts, lam)) for lam in LAMBDAS_TA},
        "TIES-Merging": {lam: val(ties_merging(pre, fts, 0.2, lam)) for lam in LAMBDAS_TIES},
        "PCB-Merging": {lam: val(pcb_merging(pre, fts, 0.1, lam)) for lam in LAMBDAS_TIES},
        "xi(1, 1) over pairs": _entanglement(zoo, limit),
    }
    bar.update()
    bar.close()
    return out


def _entanglement(zoo: zoo_mod.Zoo, limit: int) -> dict[str, float]:
    """Min, mean and max over the pairs of experts of the disentanglement error xi(1, 1)."""
    vectors = {t: task_vector(zoo.pretrained, zoo.experts[t]) for t in zoo.task_names}
    predict = zoo_predictor(zoo, "val", limit=limit)
    xi = disentanglement_matrix(predict, zoo.pretrained, vectors, 1.0, progress=False)
    pairs = xi[~torch.eye(len(vectors), dtype=torch.bool)]
    stats = {"min": pairs.min(), "mean": pairs.mean(), "max": pairs.max()}
    return {k: round(float(v), 3) for k, v in stats.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="FinetuneConfig fields, e.g. lr=1e-3")
    ap.add_argument("--out", type=Path, required=True, help="folder for the trial's experts")
    ap.add_argument("--root", type=Path, default=None, help="the built zoo (data/cache/mini)")
    ap.add_argument("--head-scale", type=float, default=None)
    ap.add_argument("--freeze", default=None, help="regex of encoder parameters not trained")
    ap.add_argument(
        "--linearized",
        action="store_true",
        help="fine-tune and evaluate the encoder linearized around theta_0 (tangent space)",
    )
    ap.add_argument("--workers", type=int, default=max(1, torch.get_num_threads()))
    ap.add_argument("--limit", type=int, default=VAL_LIMIT, help="val examples per task")
    args = ap.parse_args(argv)

    root = args.root or zoo_mod.cache_dir("mini")
    cfg = zoo_config(root)
    ft = dataclasses.replace(cfg.finetune, **parse_overrides(args.overrides))
    recipe = Recipe(ft, args.head_scale, args.freeze, args.linearized)
    zoo = zoo_mod.load_zoo("mini", cfg=cfg, root=root, build=False, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"recipe: {recipe}", flush=True)
    bar = progress_bar(total=len(zoo.task_names), desc="experts")
    for name, val, seconds in train_experts(root, args.out, zoo.task_names, recipe, args.workers):
        bar.write(f"  expert {name}: val per epoch {[round(v, 1) for v in val]}, {seconds:.0f} s")
        bar.update()
    bar.close()
    experts = {n: load_file(str(args.out / f"expert_{n}.safetensors")) for n in zoo.task_names}
    trial = dataclasses.replace(zoo.linearized() if recipe.linearized else zoo, experts=experts)
    result = report(trial, args.limit)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
