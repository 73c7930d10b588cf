"""The zoo cache: build, load, resume after an interruption, rebuild on change or corruption.

These use a deliberately tiny configuration (a 1-layer CLIP, a few dozen images per task) so
that the whole build takes seconds; ``test_mini_world.py`` builds the real one.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from course_lib.files import atomic_path, save_tensors
from course_lib.models import zoo as zoo_mod
from course_lib.models.vision import MiniClipConfig
from course_lib.models.zoo import ZooConfig, build_zoo, load_zoo, verify_zoo
from course_lib.train import FinetuneConfig

TINY = ZooConfig(
    clip=MiniClipConfig(
        corpus_size=256, epochs=1, batch_size=128, width=32, text_width=32, layers=1,
        text_layers=1, heads=2, embed_dim=16, patch_size=8,
    ),
    finetune=FinetuneConfig(epochs=1, batch_size=32, warmup_steps=1),
    sizes=(("train", 32), ("val", 16), ("test", 16)),
    tasks=("digits", "shapes", "colors"),
)  # fmt: skip
THREADS = torch.get_num_threads()


class Counter:
    """Wraps a function and counts its calls (optionally failing on the n-th call)."""

    def __init__(self, fn, fail_on: int | None = None):
        self.fn, self.calls, self.fail_on = fn, 0, fail_on

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    build_zoo(TINY, root, progress=False, log=lambda s: None, workers=2)  # 2 processes
    return root


def test_load_gives_theta0_experts_heads_and_tasks(built):
    z = load_zoo("mini", cfg=TINY, root=built, build=False, progress=False)
    assert z.task_names == list(TINY.tasks)
    assert set(z.experts) == set(TINY.tasks)
    for name in z.task_names:
        expert = z.experts[name]
        assert expert.keys() == z.pretrained.keys()
        assert any(not torch.equal(expert[k], z.pretrained[k]) for k in expert)  # it trained
        head = z.heads[name]
        assert head.shape == (z.tasks[name].num_classes, TINY.clip.embed_dim)
        torch.testing.assert_close(head.norm(dim=1), torch.ones(len(head)))
    accs = z.evaluate(z.pretrained, "test")
    assert set(accs) == set(TINY.tasks) and all(0 <= a <= 100 for a in accs.values())
    assert verify_zoo(built) == []


def test_loading_a_built_zoo_trains_nothing(built, monkeypatch):
    monkeypatch.setattr(zoo_mod, "finetune", Counter(zoo_mod.finetune, fail_on=1))
    monkeypatch.setattr(zoo_mod, "_expert_workers", lambda *args: 1)  # in this process
    load_zoo("mini", cfg=TINY, root=built, progress=False)


def test_missing_zoo_without_build_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make zoo"):
        load_zoo("mini", cfg=TINY, root=tmp_path / "none", build=False)


def test_interrupted_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    monkeypatch.setattr(zoo_mod, "finetune", Counter(zoo_mod.finetune, fail_on=2))
    with pytest.raises(KeyboardInterrupt):
        build_zoo(TINY, root, progress=False, log=lambda s: None, workers=1)
    assert not list(root.glob("expert_shapes*")), "a half-written expert must not appear"
    counter = Counter(zoo_mod.finetune)
    monkeypatch.setattr(zoo_mod, "finetune", counter)
    build_zoo(TINY, root, progress=False, log=lambda s: None, workers=1)
    assert counter.calls == 2  # shapes and colors; digits was kept
    assert verify_zoo(root) == []


def test_corrupted_file_is_detected_and_rebuilt(built, monkeypatch):
    path = built / "expert_colors.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert verify_zoo(built) == ["expert_colors.safetensors"]
    counter = Counter(zoo_mod.finetune)
    monkeypatch.setattr(zoo_mod, "finetune", counter)
    build_zoo(TINY, built, progress=False, log=lambda s: None, workers=1)
    assert counter.calls == 1
    assert verify_zoo(built) == []


def test_changed_config_rebuilds_everything(tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    small = dataclasses.replace(TINY, tasks=("colors",))
    build_zoo(small, root, progress=False, log=lambda s: None)
    changed = dataclasses.replace(small, finetune=dataclasses.replace(small.finetune, lr=1e-4))
    assert changed.digest() != small.digest()
    counter = Counter(zoo_mod.finetune)
    monkeypatch.setattr(zoo_mod, "finetune", counter)
    build_zoo(changed, root, progress=False, log=lambda s: None, workers=1)
    assert counter.calls == 1
    assert '"lr": 0.0001' in (root / "manifest.json").read_text()


def test_experts_are_the_same_bits_for_any_number_of_workers(built, tmp_path):
    """Each expert trains on one thread, in or out of a worker process: the zoo built by two
    worker processes (the fixture) equals one built in this process, one expert after another."""
    root = tmp_path / "zoo"
    build_zoo(TINY, root, progress=False, log=lambda s: None, workers=1)
    for name in TINY.tasks:
        a = load_file(str(built / f"expert_{name}.safetensors"))
        b = load_file(str(root / f"expert_{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert torch.get_num_threads() == THREADS  # the thread count of this process is restored


def test_torch_threads_sets_and_restores_the_thread_count():
    from course_lib.config import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("restored on errors too")
    with torch_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_how_many_experts_train_at_once(monkeypatch):
    ft = TINY.finetune  # threads=1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert zoo_mod._expert_workers(8, None, ft) == zoo_mod.MAX_EXPERT_WORKERS == 4
    assert zoo_mod._expert_workers(3, None, ft) == 3  # never more workers than experts
    assert zoo_mod._expert_workers(8, 2, ft) == 2  # asked for
    assert zoo_mod._expert_workers(8, None, dataclasses.replace(ft, threads=8)) == 2
    assert zoo_mod._expert_workers(8, None, dataclasses.replace(ft, threads=None)) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert zoo_mod._expert_workers(8, None, ft) == 1  # one thread: in this process


def test_an_error_in_a_worker_process_reaches_the_caller(built):
    jobs = zoo_mod._finetune_experts(built, ["digits", "no_such_task"], TINY.finetune, 2, False)
    with pytest.raises(KeyError, match="no_such_task"):  # it has no head
        list(jobs)
    assert not multiprocessing.active_children()  # the workers were stopped, not left running


def _mark_exit(folder: str, item: int) -> int:
    """Run in a worker: on the worker's normal exit, after half a second, leave a file named by
    its pid in ``folder`` (a worker killed by terminate() is gone before it writes it)."""
    from multiprocessing import util

    def mark() -> None:
        time.sleep(0.5)
        Path(folder, str(os.getpid())).touch()

    util.Finalize(None, mark, exitpriority=100)
    return os.getpid()


def test_workers_exit_normally_once_every_result_is_back(tmp_path):
    # Killed workers leave what they made to the resource tracker ("leaked semaphore" warnings
    # at the end of a zoo build: the lock `datasets` makes tqdm create in each worker).
    job = functools.partial(_mark_exit, str(tmp_path))
    pids = set(zoo_mod.imap_in_workers(job, range(4), 2))
    assert {int(f.name) for f in tmp_path.iterdir()} == pids  # every worker ran its clean-up
    assert not multiprocessing.active_children()


def test_atomic_path_leaves_the_target_untouched_on_error(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary left behind


def test_save_tensors_writes_contiguous_safetensors_with_metadata(tmp_path):
    from safetensors import safe_open

    t = torch.arange(12.0).reshape(3, 4)
    path = save_tensors(tmp_path / "a.safetensors", {"t": t.T, "b": t[0]}, {"seconds": "1.5"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"seconds": "1.5"}
        assert torch.equal(f.get_tensor("t"), t.T)  # a transposed view is saved by value
        assert torch.equal(f.get_tensor("b"), t[0])
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_twin_pieces_on_the_tiny_zoo(built):
    from course_lib import experiments as ex
    from course_lib.merging import compress, shared_expert, twin_vectors

    z = load_zoo("mini", cfg=TINY, root=built, build=False, progress=False)
    shared = shared_expert(z.pretrained, z.finetuned())
    dense = compress(twin_vectors(shared, z.finetuned()), rank_ratio=1.0)
    stacked = ex.stacked_vectors(shared, dense)
    enc = ex.vmappable_encoder(z)
    x, _ = next(z.tasks["digits"].batches("test", 4))
    one_hot = torch.zeros(4, 3)
    one_hot[:, 0] = 1.0  # every input routed to the digits expert: the expert itself
    got = ex.per_input_embeddings(enc, shared, stacked, one_hot, x)
    want = torch.nn.functional.normalize(
        z.encoder(z.experts["digits"])(pixel_values=x).image_embeds, dim=-1
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    router = ex.train_task_router(z, epochs=2, progress=False)
    res = ex.twin_accuracy(z, shared, dense, router, limit=8, progress=False)
    assert set(res.accuracy) == set(z.task_names) and res.confusion.sum() == 24
    assert res.compression >= 1.0  # full rank stores more than dense (two factors)
    mixed = ex.mixed_stream(z, shared, dense, router, per_task=8, batch_size=5)
    assert set(mixed) == set(z.task_names)
    assert all(0.0 <= v <= 100.0 for v in mixed.values())
    # per-input merging does not care what else is in the batch: the mixed, shuffled stream
    # scores what the task-by-task evaluation scores (up to one float-noise flip per task)
    for t in z.task_names:
        assert abs(mixed[t] - res.accuracy[t]) <= 100 / 8 + 1e-9
    # a test split smaller than per_task (16 here): each task is scored over the inputs it has
    whole = ex.mixed_stream(z, shared, dense, router, per_task=100, batch_size=16)
    full = ex.twin_accuracy(z, shared, dense, router, progress=False)
    for t in z.task_names:
        assert abs(whole[t] - full.accuracy[t]) <= 100 / 16 + 1e-9


def test_negation_says_when_no_lambda_passes_the_control_rule(built):
    from course_lib import experiments as ex

    z = load_zoo("mini", cfg=TINY, root=built, build=False, progress=False)
    loose = ex.negation(z, "colors", lambdas=(0.1, 0.5), tolerance=101.0)  # every lambda passes
    assert loose.within_tolerance and loose.scaling == 0.5
    strict = ex.negation(z, "colors", lambdas=(0.1, 0.5), tolerance=-101.0)  # none can pass
    assert not strict.within_tolerance and strict.scaling == 0.1
    assert strict.tolerance == -101.0


def test_evaluations_are_remembered_per_task_and_state(built, tmp_path, monkeypatch):
    from course_lib import config, evalcache

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    z = load_zoo("mini", cfg=TINY, root=built, build=False, progress=False)
    assert z.world == TINY.digest()
    calls = Counter(zoo_mod.accuracy)
    monkeypatch.setattr(zoo_mod, "accuracy", calls)
    with evalcache.using("on"):
        first = z.evaluate(z.pretrained, "test")
        assert calls.calls == len(TINY.tasks)
        assert z.evaluate(None, "test") == first and calls.calls == len(TINY.tasks)  # served
        expert = z.experts["digits"]
        one = z.evaluate(expert, "test", ["digits"])
        assert z.evaluate(expert, "test")["digits"] == one["digits"]
        assert calls.calls == 2 * len(TINY.tasks)  # the expert once per task
        z.heads["shapes"] = z.heads["shapes"].flip(0)  # another head: evaluated again
        z.evaluate(None, "test", ["shapes"])
        assert calls.calls == 2 * len(TINY.tasks) + 1
    with evalcache.using("off"):
        assert z.evaluate(expert, "test", ["digits"]) == one  # the same number computed again
        assert calls.calls == 2 * len(TINY.tasks) + 2


def test_twin_counts_are_remembered_per_router_and_vectors(built, tmp_path, monkeypatch):
    from course_lib import config, evalcache
    from course_lib import experiments as ex
    from course_lib.merging import compress, shared_expert, twin_vectors

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    z = load_zoo("mini", cfg=TINY, root=built, build=False, progress=False)
    shared = shared_expert(z.pretrained, z.finetuned())
    vectors = twin_vectors(shared, z.finetuned())
    low, dense = compress(vectors, rank_ratio=0.25), compress(vectors, rank_ratio=1.0)
    router = ex.train_task_router(z, epochs=2, progress=False)
    calls = Counter(ex.per_input_logits)
    monkeypatch.setattr(ex, "per_input_logits", calls)
    with evalcache.using("on"):
        first = ex.twin_accuracy(z, shared, low, router, limit=8, progress=False)
        computed = calls.calls
        again = ex.twin_accuracy(z, shared, low, router, limit=8, progress=False)
        assert calls.calls == computed  # served: no merged forward pass
        assert (again.accuracy, again.router_accuracy) == (first.accuracy, first.router_accuracy)
        assert torch.equal(again.confusion, first.confusion)
        ex.twin_accuracy(z, shared, dense, router, limit=8, progress=False)  # other vectors
        assert calls.calls == 2 * computed
        other = copy.deepcopy(router)
        with torch.no_grad():
            other.net[0].bias[0] += 1e-3
        ex.twin_accuracy(z, shared, low, other, limit=8, progress=False)  # another router
        assert calls.calls == 3 * computed
    with evalcache.using("off"):
        fresh = ex.twin_accuracy(z, shared, low, router, limit=8, progress=False)
        assert fresh.accuracy == first.accuracy and torch.equal(fresh.confusion, first.confusion)


def test_zoo_predictions_are_the_classifier_ones_and_remembered(built, tmp_path, monkeypatch):
    from course_lib import config, evalcache
    from course_lib.analysis import zoo_predictor
    from course_lib.eval import predictions

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    z = load_zoo("mini", cfg=TINY, root=built, build=False, progress=False)
    predict = zoo_predictor(z, "val", limit=8)
    calls = Counter(zoo_mod.predictions)
    monkeypatch.setattr(zoo_mod, "predictions", calls)
    with evalcache.using("on"):
        for task in TINY.tasks:
            got = predict(z.experts[task], task)
            want, _ = predictions(z.classifier(task, z.experts[task]), z.tasks[task], "val")
            assert got.dtype == torch.int64 and torch.equal(got, want[:8]), task
        assert calls.calls == len(TINY.tasks)
        again = predict(z.experts["digits"], "digits")  # served from the cache
        assert calls.calls == len(TINY.tasks) and torch.equal(
            again, predict(z.experts["digits"], "digits")
        )
        z.predict(None, "digits", "val", limit=4)  # theta_0, another limit: computed
        assert calls.calls == len(TINY.tasks) + 1
    with evalcache.using("off"):
        assert torch.equal(predict(z.experts["digits"], "digits"), again)
        assert calls.calls == len(TINY.tasks) + 2
