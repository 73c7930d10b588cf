"""The model zoo: theta_0, one expert per task, the zero-shot heads and the task data.

``load_zoo()`` is what every notebook calls first. In the ``mini`` profile the zoo is built
once on the CPU (pretrain the mini-CLIP, compute the heads, fine-tune eight experts side by
side in worker processes) into ``data/cache/mini/`` and afterwards loaded in seconds. In the
``full`` profile the same object is filled from the Hugging Face hub
(``openai/clip-vit-base-patch32`` and the published experts); only the heads are cached.

The cache is safe to interrupt and to share:

* every file is written to a temporary name and renamed into place (atomic on POSIX);
* ``manifest.json`` records the hash of the build configuration and the sha256 of every file,
  and is rewritten (atomically) after each finished step, so an interrupted build resumes at the
  first missing step;
* a different configuration (other sizes, seeds, recipe, or a new ``FORMAT``) rebuilds from
  scratch; a file whose sha256 no longer matches is rebuilt, together with what depends on it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import CLIPModel, CLIPVisionConfig

from course_lib import config, evalcache
from course_lib.config import progress_bar
from course_lib.data.base import VisionTask
from course_lib.eval import accuracy, predictions
from course_lib.files import atomic_path, save_tensors, sha256, write_json
from course_lib.models import hub
from course_lib.models.linearized import Linearized
from course_lib.models.vision import MiniClipConfig, ZeroShotClassifier, zeroshot_head
from course_lib.train import FinetuneConfig, FinetuneHistory, finetune

T = TypeVar("T")
R = TypeVar("R")

FORMAT = 1  # bump when the layout of the cache changes


@dataclass(frozen=True)
class ZooConfig:
    """Everything that determines the mini zoo's bits; its hash names the build."""

    clip: MiniClipConfig = MiniClipConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    sizes: tuple[tuple[str, int], ...] = (("train", 3000), ("val", 500), ("test", 1000))
    tasks: tuple[str, ...] | None = None  # None: all of course_lib.data.vision.TASKS
    data_seed: int = 0

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "clip": self.clip.to_dict(),
            "finetune": self.finetune.to_dict(),
            "sizes": dict(self.sizes),
            "tasks": list(self.task_names()),
            "data_seed": self.data_seed,
        }

    def task_names(self) -> tuple[str, ...]:
        from course_lib.data.vision import TASKS

        return TASKS if self.tasks is None else tuple(self.tasks)

    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Zoo:
    """theta_0, the experts and heads of every task, and the tasks themselves."""

    profile: str
    tasks: dict[str, VisionTask]
    pretrained: dict[str, Tensor]
    experts: dict[str, dict[str, Tensor]]
    heads: dict[str, Tensor]
    encoder_config: CLIPVisionConfig
    logit_scale: float = 100.0
    info: dict = field(default_factory=dict)
    world: str = ""  # what was loaded: the mini config's digest, or the full model's id
    # per task, the digest of the data served when ``world`` does not cover it (full profile)
    data: dict[str, str] = field(default_factory=dict)
    linear: bool = False  # evaluate with the encoder linearized around theta_0 (linearized())
    _encoder: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def linearized(self) -> Zoo:
        """This zoo, evaluated through the encoder's first-order Taylor expansion around theta_0,
        ``f(x; theta_0) + J(x) (theta - theta_0)`` (:mod:`course_lib.models.linearized`).

        Meant for experts fine-tuned linearized as well (``tools/expert_recipes.py
        --linearized``), as in Ortiz-Jimenez et al. (NeurIPS 2023), Sec. 5. Its evaluations are
        remembered apart from the plain encoder's."""
        if self.linear:
            return self
        return replace(self, linear=True, world=f"{self.world}+linearized", _encoder=None)

    def finetuned(self) -> list[dict[str, Tensor]]:
        """The experts' state dicts in task order: the ``finetuned`` argument of every merge."""
        return [self.experts[t] for t in self.tasks]

    def encoder(self, state: Mapping[str, Tensor] | None = None) -> torch.nn.Module:
        """A fresh image encoder loaded with ``state`` (theta_0 by default), linearized around
        theta_0 in a :meth:`linearized` zoo."""
        if not self.linear:
            return hub.build_image_encoder(self.encoder_config, state or self.pretrained)
        linear = Linearized(hub.build_image_encoder(self.encoder_config, self.pretrained))
        linear.load_state_dict(dict(state or self.pretrained), strict=True)
        return linear

    def classifier(self, task: str, state: Mapping[str, Tensor] | None = None):
        """Image encoder with ``state`` + the frozen zero-shot head of ``task``."""
        return ZeroShotClassifier(self.encoder(state), self.heads[task], self.logit_scale)

    def evaluate(
        self,
        state: Mapping[str, Tensor] | None = None,
        split: str = "test",
        tasks: list[str] | None = None,
        *,
        limit: int | None = None,
    ) -> dict[str, float]:
        """Accuracy (%) of one image-encoder state on each task, with that task's head.

        Accuracies are remembered in the cache (:mod:`course_lib.evalcache`): the same weights
        on the same data are evaluated once."""
        state = state or self.pretrained
        memo = evalcache.Memo(self.world, state, split, limit)
        encoder = functools.cache(lambda: self._load_encoder(state))  # built once, if needed

        def compute(task: str) -> float:
            clf = ZeroShotClassifier(encoder(), self.heads[task], self.logit_scale)
            return accuracy(clf, self.tasks[task], split, device=config.device(), limit=limit)

        tasks = tasks or self.task_names
        return {
            t: memo(t, functools.partial(compute, t), functools.partial(self.task_salt, t))
            for t in tasks
        }

    def predict(
        self,
        state: Mapping[str, Tensor] | None,
        task: str,
        split: str = "val",
        *,
        limit: int | None = None,
    ) -> Tensor:
        """The class predicted for each of the first ``limit`` examples of ``task``'s ``split``
        by the encoder with ``state`` (theta_0 by default) and the task's zero-shot head; int64.

        Remembered in the evaluation cache like the accuracies, under the same key parts."""
        state = state or self.pretrained

        def compute() -> Tensor:
            clf = ZeroShotClassifier(self._load_encoder(state), self.heads[task], self.logit_scale)
            return predictions(clf, self.tasks[task], split, device=config.device(), limit=limit)[0]

        memo = evalcache.Memo(self.world, state, split, limit)
        return memo(task, compute, functools.partial(self.task_salt, task), kind="tensor")

    def task_salt(self, task: str) -> str:
        """What an evaluation on ``task`` depends on besides the weights: its head and scale,
        and its data where ``world`` does not name it (the full profile's unpinned datasets)."""
        return evalcache.tensor_salt(self.heads[task], self.logit_scale) + self.data.get(task, "")

    def _load_encoder(self, state: Mapping[str, Tensor]) -> torch.nn.Module:
        """The zoo's image encoder (built on first use) with ``state`` loaded into it."""
        if self._encoder is None:
            encoder = hub.build_image_encoder(self.encoder_config, self.pretrained)
            self._encoder = Linearized(encoder) if self.linear else encoder
        self._encoder.load_state_dict(dict(state), strict=True)
        return self._encoder


# ----------------------------------------------------------------------------- cache plumbing


class Manifest:
    """``manifest.json``: config hash + {file: sha256}, rewritten atomically after each step."""

    def __init__(self, root: Path, digest: str, cfg: dict):
        self.root, self.path = root, root / "manifest.json"
        self.data = {"config_hash": digest, "config": cfg, "files": {}, "info": {}}
        if self.path.exists():
            old = json.loads(self.path.read_text())
            if old.get("config_hash") == digest:
                self.data = old
            else:  # another configuration: start over
                shutil.rmtree(root)

    def valid(self, name: str) -> bool:
        """The file exists and still has the recorded sha256 (a corrupted file is not valid)."""
        p = self.root / name
        return name in self.data["files"] and p.exists() and sha256(p) == self.data["files"][name]

    def record(self, name: str, **info) -> None:
        self.data["files"][name] = sha256(self.root / name)
        if info:
            self.data["info"][name] = info
        self.save()

    def forget(self, *names: str) -> None:
        for n in names:
            self.data["files"].pop(n, None)
            self.data["info"].pop(n, None)

    def save(self) -> None:
        write_json(self.path, self.data, indent=1, sort_keys=True)


# ----------------------------------------------------------------------------- the mini build


def cache_dir(profile: str) -> Path:
    return config.CACHE_DIR / profile


def build_zoo(
    cfg: ZooConfig | None = None,
    root: Path | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    workers: int | None = None,
) -> Path:
    """Build (or resume, or repair) the mini zoo in ``root``; returns ``root``.

    ``workers``: how many experts to fine-tune at once, each in its own process (default: one
    per thread PyTorch may use, at most :data:`MAX_EXPERT_WORKERS`; 1 trains them one by one in
    this process). Each expert trains on ``cfg.finetune.threads`` PyTorch threads (1), so the
    zoo's bits do not depend on ``workers``."""
    from course_lib.data import vision as data_vision
    from course_lib.models import vision as mv

    cfg = cfg or ZooConfig()
    root = Path(root) if root is not None else cache_dir("mini")
    man = Manifest(root, cfg.digest(), cfg.to_dict())  # wipes root for another configuration
    root.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    # 1. Task data, cached so that loading the zoo does not regenerate it.
    for name in cfg.task_names():
        fname = f"data_{name}"
        if not man.valid(fname):
            t0 = time.perf_counter()
            task = data_vision.load_task(name, "mini", seed=cfg.data_seed, sizes=dict(cfg.sizes))
            with atomic_path(root / fname) as tmp:
                _save_task(task, tmp)
            man.record(fname, seconds=round(time.perf_counter() - t0, 2))

    # 2. theta_0: the contrastively pretrained mini-CLIP (both towers) and its tokenizer.
    if not (man.valid("clip.safetensors") and man.valid("tokenizer.json")):
        man.forget(*[n for n in list(man.data["files"]) if not n.startswith("data_")])
        t0 = time.perf_counter()
        images, captions = data_vision.caption_corpus(cfg.clip.corpus_size, seed=cfg.clip.seed)
        tokenizer = mv.build_tokenizer(data_vision.corpus_vocabulary())
        clip, losses = mv.pretrain_clip(cfg.clip, images, captions, tokenizer, progress=progress)
        with atomic_path(root / "tokenizer.json") as tmp:
            tokenizer.backend_tokenizer.save(str(tmp))
        save_tensors(root / "clip.safetensors", clip.state_dict())
        with atomic_path(root / "clip_config.json") as tmp:
            tmp.write_text(clip.config.to_json_string())
        man.record("tokenizer.json")
        man.record(
            "clip.safetensors",
            seconds=round(time.perf_counter() - t0, 1),
            first_loss=losses[0],
            last_loss=sum(losses[-20:]) / len(losses[-20:]),
        )
        log(f"pretrained mini-CLIP in {time.perf_counter() - t0:.0f} s")
    clip, tokenizer = _load_mini_clip(root)
    tasks = {n: _load_task(root, n) for n in cfg.task_names()}

    # 3. Zero-shot heads.
    if not man.valid("heads.safetensors"):
        heads = {
            n: zeroshot_head(
                clip, tokenizer, t.classnames, t.templates, max_len=cfg.clip.max_text_len
            )
            for n, t in tasks.items()
        }
        save_tensors(root / "heads.safetensors", heads)
        man.record("heads.safetensors")
    # 4. One expert per task, several at once (each on one thread: see _expert_workers).
    pending = [n for n in tasks if not man.valid(f"expert_{n}.safetensors")]
    bar = progress_bar(total=len(pending), desc="experts", progress=progress and len(pending) > 1)
    jobs = _finetune_experts(root, pending, cfg.finetune, workers, progress)
    for name, state, hist, seconds in jobs:
        save_tensors(root / f"expert_{name}.safetensors", state)
        man.record(f"expert_{name}.safetensors", seconds=round(seconds, 1), **_summary(hist))
        log(f"expert {name}: val {max(hist.val_accuracy):.1f}% in {seconds:.0f} s")
        bar.update()
    bar.close()
    man.data["info"]["build_seconds_last_run"] = round(time.perf_counter() - t_all, 1)
    man.data["info"]["logit_scale"] = _head_scale(clip)
    man.save()
    return root


MAX_EXPERT_WORKERS = 4  # worker processes at most: each holds PyTorch, an encoder and a task


def _expert_workers(jobs: int, workers: int | None, ft: FinetuneConfig) -> int:
    """How many experts to fine-tune at once: ``workers``, or as many as PyTorch's threads hold
    trainings of ``ft.threads`` threads (one by one when ``ft.threads`` is None), at most
    :data:`MAX_EXPERT_WORKERS`.

    An expert trains on ``ft.threads`` = 1 PyTorch thread by default, so its bits do not depend
    on the machine's cores nor on what runs beside it. Side by side is faster: on two cores two
    single-threaded fine-tunings together took 49-52 s, one after the other on two threads
    2 x 35 s (small matrices leave the second thread of one training idle much of the time)."""
    if workers is None:
        per_worker = ft.threads or torch.get_num_threads()
        workers = min(MAX_EXPERT_WORKERS, torch.get_num_threads() // per_worker)
    return max(1, min(jobs, workers))


def _finetune_experts(
    root: Path, names: list[str], ft: FinetuneConfig, workers: int | None, progress: bool
) -> Iterator[tuple[str, dict[str, Tensor], FinetuneHistory, float]]:
    """Fine-tune the experts ``names`` (in worker processes when more than one runs at once);
    yield ``(name, state, history, seconds)`` as each one finishes."""
    workers = _expert_workers(len(names), workers, ft)
    if workers == 1:
        for name in names:
            yield _train_expert(root, name, ft, progress)
        return
    yield from imap_in_workers(
        functools.partial(_train_expert, root, ft=ft, progress=False), names, workers
    )


def imap_in_workers(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """``fn(item)`` for every item in ``workers`` spawned processes; yield each result as it
    comes (in any order).

    spawn, not fork: a forked child inherits PyTorch's thread pool in an unusable state. Once
    every result is back the workers are closed and joined, so they exit normally and clean up
    after themselves (a worker killed instead leaves, for example, the lock that ``datasets``
    makes tqdm create in it to Python's resource tracker, which then warns of a "leaked
    semaphore" at shutdown). On an error, an interrupt or a caller that stops early, leaving
    the ``with`` block terminates them at once (what came back before is the caller's)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(fn, items)
        pool.close()
        pool.join()


def _train_expert(
    root: Path, name: str, ft: FinetuneConfig, progress: bool
) -> tuple[str, dict[str, Tensor], FinetuneHistory, float]:
    """Fine-tune the expert of ``name`` from what the zoo in ``root`` holds (on ``ft.threads``
    PyTorch threads: :func:`course_lib.train.finetune`); return name, state, history, seconds."""
    t0 = time.perf_counter()
    clip, _ = _load_mini_clip(root)
    head = load_file(str(root / "heads.safetensors"))[name]
    encoder = hub.build_image_encoder(hub.encoder_config(clip), hub.image_encoder_state(clip))
    model = ZeroShotClassifier(encoder, head, _head_scale(clip))
    state, hist = finetune(model, _load_task(root, name), ft, progress=progress)
    return name, state, hist, time.perf_counter() - t0


def _head_scale(clip: CLIPModel) -> float:
    """The mini-CLIP's learned logit scale exp(t), clamped at 100 as in its pretraining loss:
    what the zero-shot heads multiply their cosines by (recorded in the manifest's info)."""
    return clip.logit_scale.detach().exp().clamp(max=100.0).item()


def _summary(hist: FinetuneHistory) -> dict:
    return {"val_accuracy": hist.val_accuracy, "best_epoch": hist.best_epoch}


def _save_task(task: VisionTask, path: Path) -> None:
    from datasets.utils.tqdm import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()  # one "Saving the dataset" bar per split and task is noise
    try:
        _write_task(task, path)
    finally:
        if not was_disabled:
            enable_progress_bars()


def _write_task(task: VisionTask, path: Path) -> None:
    path.mkdir(parents=True)
    meta = {"name": task.name, "classnames": task.classnames, "templates": task.templates}
    (path / "task.json").write_text(json.dumps(meta, indent=1))
    for split, ds in task.splits.items():
        ds.save_to_disk(str(path / split))


def _load_task(root: Path, name: str) -> VisionTask:
    from datasets import load_from_disk

    from course_lib.data.vision import MiniVisionTask

    path = root / f"data_{name}"
    meta = json.loads((path / "task.json").read_text())
    splits = {s.name: load_from_disk(str(s)) for s in sorted(path.iterdir()) if s.is_dir()}
    return MiniVisionTask(meta["name"], meta["classnames"], meta["templates"], splits)


def _load_mini_clip(root: Path):
    from transformers import CLIPConfig, PreTrainedTokenizerFast

    from course_lib.models.vision import SPECIAL_TOKENS

    clip_cfg = CLIPConfig.from_json_file(str(root / "clip_config.json"))
    clip = CLIPModel(clip_cfg)
    clip.load_state_dict(load_file(str(root / "clip.safetensors")), strict=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(root / "tokenizer.json"),
        pad_token=SPECIAL_TOKENS[0],
        unk_token=SPECIAL_TOKENS[1],
        bos_token=SPECIAL_TOKENS[2],
        eos_token=SPECIAL_TOKENS[3],
    )
    return clip.eval(), tok


def load_zoo(
    profile: str | None = None,
    *,
    cfg: ZooConfig | None = None,
    root: Path | None = None,
    build: bool = True,
    progress: bool = True,
) -> Zoo:
    """The zoo of ``profile`` (default: the active one), building the mini zoo if needed."""
    profile = profile or config.profile()
    if profile == "full":
        return load_full_zoo(root=root, progress=progress)
    cfg = cfg or ZooConfig()
    root = Path(root) if root is not None else cache_dir("mini")
    manifest = root / "manifest.json"
    data = json.loads(manifest.read_text()) if manifest.exists() else {}
    names = [f"data_{n}" for n in cfg.task_names()]
    names += ["clip.safetensors", "tokenizer.json", "heads.safetensors"]
    names += [f"expert_{n}.safetensors" for n in cfg.task_names()]
    complete = data.get("config_hash") == cfg.digest() and all(
        n in data["files"] and (root / n).exists() for n in names
    )
    if not complete:
        if not build:
            raise FileNotFoundError(f"no complete mini zoo in {root}; run `make zoo`")
        build_zoo(cfg, root, progress=progress)
        data = json.loads(manifest.read_text())
    clip, _ = _load_mini_clip(root)
    tasks = {n: _load_task(root, n) for n in cfg.task_names()}
    return Zoo(
        profile="mini",
        tasks=tasks,
        pretrained=hub.image_encoder_state(clip),
        experts={n: load_file(str(root / f"expert_{n}.safetensors")) for n in tasks},
        heads=load_file(str(root / "heads.safetensors")),
        encoder_config=hub.encoder_config(clip),
        logit_scale=data["info"]["logit_scale"],
        info=data["info"],
        world=cfg.digest(),
    )


def verify_zoo(root: Path | None = None) -> list[str]:
    """Names of cached files whose sha256 no longer matches the manifest (empty: all good)."""
    root = Path(root) if root is not None else cache_dir("mini")
    data = json.loads((root / "manifest.json").read_text())
    return [n for n, h in data["files"].items() if not (root / n).exists() or sha256(root / n) != h]


# ----------------------------------------------------------------------------- the full profile


def head_digest(model: str, task: VisionTask) -> str:
    """What a zero-shot head depends on: the CLIP (id and revision), class names, templates."""
    blob = json.dumps([model, task.classnames, task.templates]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _full_heads(
    path: Path, clip: CLIPModel, tokenizer, tasks: Mapping[str, VisionTask]
) -> dict[str, Tensor]:
    """The full profile's zero-shot heads: read from ``path`` when each was built from the same
    model, class names and templates (its digest is stored beside it), else built and saved."""
    model = f"{hub.FULL_MODEL}@{hub.REVISIONS[hub.FULL_MODEL]}"
    digests = {n: head_digest(model, t) for n, t in tasks.items()}
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            stored = f.metadata() or {}
        if all(stored.get(n) == d for n, d in digests.items()):
            return load_file(str(path))
    dev = config.device()
    heads = {
        n: zeroshot_head(clip, tokenizer, t.classnames, t.templates, device=dev)
        for n, t in tasks.items()
    }
    save_tensors(path, heads, metadata=digests)
    return heads


def load_full_zoo(root: Path | None = None, *, progress: bool = True) -> Zoo:
    """CLIP ViT-B/32 and the eight published experts from the hub (GPU recommended)."""
    from course_lib.data import vision_hub

    root = Path(root) if root is not None else cache_dir("full")
    clip, tokenizer = hub.load_clip()
    theta0 = hub.image_encoder_state(clip)
    tasks = {n: vision_hub.load_hub_task(n) for n in vision_hub.FULL_TASKS}
    heads = _full_heads(root / "heads.safetensors", clip, tokenizer, tasks)
    experts = {n: hub.load_expert(n, theta0) for n in tasks}
    return Zoo(
        profile="full",
        tasks=tasks,
        pretrained=theta0,
        experts=experts,
        heads=heads,
        encoder_config=hub.encoder_config(clip),
        logit_scale=clip.logit_scale.detach().exp().item(),
        world=hub.FULL_MODEL,
        data={n: vision_hub.data_digest(t) for n, t in tasks.items()},
    )
