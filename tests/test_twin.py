"""Twin-Merging building blocks: shared expert, twin vectors, SVD compression, router."""

import math

import pytest
import torch
from conftest import random_models
from torch.testing import assert_close

from course_lib.merging import (
    Router,
    compress,
    merge_with_weights,
    shared_expert,
    task_arithmetic,
    ties_merging,
    train_router,
    twin_vectors,
    weight_average,
)
from course_lib.merging.twin import (
    LowRank,
    compressed_from_tensors,
    compressed_tensors,
    low_rank,
    svd_rank,
)


def test_merge_with_weights_keeps_a_tied_key_tied_to_its_merged_source():
    emb = torch.randn(5, 3)
    pre = {"embed.weight": emb, "lm_head.weight": emb, "ln": torch.ones(3)}  # one storage
    fts = []
    for s in (1.0, -2.0):
        w = emb + s
        fts.append({"embed.weight": w, "lm_head.weight": w, "ln": torch.ones(3) * s})
    shared = shared_expert(pre, fts)
    vectors = twin_vectors(shared, fts)
    assert set(vectors[0]) == {"embed.weight", "ln"}  # the tied key is merged once
    out = merge_with_weights(shared, vectors, [1.0, 0.0])
    assert out["lm_head.weight"] is out["embed.weight"]
    assert_close(out["lm_head.weight"], fts[0]["lm_head.weight"])


def test_shared_expert_defaults_to_task_arithmetic_0_3(models):
    pre, fts = models
    assert_close(
        shared_expert(pre, fts)["enc.weight"], task_arithmetic(pre, fts, 0.3)["enc.weight"]
    )
    ties = shared_expert(pre, fts, merge=ties_merging, density=0.5)
    assert_close(ties["enc.weight"], ties_merging(pre, fts, density=0.5)["enc.weight"])


def test_twin_vectors_are_expert_minus_shared(models):
    pre, fts = models
    sh = shared_expert(pre, fts)
    vs = twin_vectors(sh, fts)
    assert_close(vs[2]["enc.bias"], fts[2]["enc.bias"] - sh["enc.bias"])


def test_svd_rank_and_exact_low_rank():
    assert svd_rank((768, 768), 0.1) == 77
    assert svd_rank((10, 3), 0.1) == 1
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 2, generator=g) @ torch.randn(2, 9, generator=g)  # rank 2
    lr = low_rank(a, 2)
    assert lr.left.shape == (12, 2) and lr.right.shape == (2, 9)
    assert_close(lr.dense(), a, atol=1e-5, rtol=1e-5)


def test_low_rank_error_is_the_dropped_singular_values():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20, 16, generator=g)
    s = torch.linalg.svdvals(a.double())
    err = (low_rank(a, 4).dense().double() - a.double()).norm()
    assert float(err) == pytest.approx(float(s[4:].norm()), rel=1e-5)  # Eckart-Young


def test_compress_reports_the_true_storage_cost():
    vec = {"w": torch.randn(100, 40), "b": torch.randn(100)}
    (c,) = compress([vec], rank_ratio=0.1)
    k = math.ceil(0.1 * 40)
    assert c.stored_params == k * (100 + 40) + 100
    assert c.dense_params == 100 * 40 + 100
    assert c.compression == pytest.approx((k * 140 + 100) / 4100)
    assert torch.equal(c["b"], vec["b"])  # 1-D stays dense


def test_compress_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank_ratio"):
        compress([{"w": torch.randn(4, 4)}], rank_ratio=0.0)
    with pytest.raises(ValueError, match="method"):
        compress([{"w": torch.randn(4, 4)}], method="magnitude")


def test_router_weights_drive_the_merge(models):
    pre, fts = models
    sh = shared_expert(pre, fts)
    vs = twin_vectors(sh, fts)
    w = torch.tensor([0.2, 0.5, 0.3])
    out = merge_with_weights(sh, vs, w)
    k = "enc.weight"
    expected = sh[k] + sum(float(wt) * (ft[k] - sh[k]) for wt, ft in zip(w, fts, strict=True))
    assert_close(out[k], expected)
    # A group of inputs shares one model built from the mean of their weights.
    group = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert_close(
        merge_with_weights(sh, vs, group)[k], merge_with_weights(sh, vs, [0.5, 0.0, 0.5])[k]
    )
    with pytest.raises(ValueError, match="shape"):
        merge_with_weights(sh, vs, [0.5, 0.5])


def test_compressed_merge_approaches_the_expert_as_rank_grows(models):
    pre, fts = models
    sh = shared_expert(pre, fts)
    vs = twin_vectors(sh, fts)
    errs = []
    for ratio in (0.2, 0.5, 1.0):
        out = merge_with_weights(sh, compress(vs, rank_ratio=ratio), [0.0, 1.0, 0.0])
        errs.append(float((out["enc.weight"] - fts[1]["enc.weight"]).norm()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-5


def test_router_learns_separable_tasks():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    labels = torch.arange(3).repeat_interleave(60)
    feats = centers[labels] + torch.randn(180, 8, generator=g)
    router = Router(8, 3)
    hist = train_router(router, feats, labels, epochs=30, lr=5e-3, batch_size=32, progress=False)
    assert hist.val_accuracy[hist.best_epoch] == max(hist.val_accuracy)
    w = router.weights(feats)
    assert w.shape == (180, 3)
    assert_close(w.sum(-1), torch.ones(180))
    assert float((w.argmax(-1) == labels).float().mean()) > 0.95


def test_router_initialization_depends_on_its_seed_only():
    torch.manual_seed(1)
    a = Router(8, 3)
    torch.randn(100)  # other work draws on the global random state in between
    state = torch.get_rng_state()
    b = Router(8, 3)
    assert torch.equal(state, torch.get_rng_state())  # and building a router leaves it alone
    c = Router(8, 3, seed=1)
    for k, va in a.state_dict().items():
        assert torch.equal(va, b.state_dict()[k]), k
    assert not torch.equal(a.net[0].weight, c.net[0].weight)


def test_uniform_weights_give_the_average_and_one_hot_the_expert():
    pre, fts = random_models(num_tasks=4, seed=2)
    sh = shared_expert(pre, fts)
    vs = twin_vectors(sh, fts)
    avg = weight_average(fts)
    out = merge_with_weights(sh, vs, [0.25] * 4)
    for k in pre:
        assert_close(out[k], avg[k], atol=1e-6, rtol=1e-5)
        assert_close(merge_with_weights(sh, vs, [0, 0, 1, 0])[k], fts[2][k], atol=1e-6, rtol=1e-5)


def test_router_selection_by_val_loss_keeps_a_more_confident_epoch():
    from course_lib.merging import Router, train_router

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(32, 4, generator=g) + 3, torch.randn(32, 4, generator=g) - 3])
    y = torch.cat([torch.zeros(32), torch.ones(32)]).long()
    conf = {}
    for select in ("accuracy", "loss"):
        r = Router(4, 2, dropout=0.0)
        hist = train_router(r, x, y, (x, y), epochs=40, lr=1e-2, select=select, progress=False)
        conf[select] = (hist.best_epoch, float(r.weights(x).max(-1).values.mean()))
    assert conf["accuracy"][0] < conf["loss"][0]  # the first 100% epoch vs a later one
    assert conf["loss"][1] > conf["accuracy"][1]  # ... whose weights are surer
    with pytest.raises(ValueError, match="select"):
        train_router(Router(4, 2), x, y, select="f1", progress=False)


def test_compressed_vectors_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    big = {"a.weight": (40, 30), "a.bias": (40,), "b.weight": (30, 40)}
    pre, fts = random_models(shapes=big)
    compressed = compress(twin_vectors(shared_expert(pre, fts), fts), rank_ratio=0.1)
    save_file(compressed_tensors(compressed), tmp_path / "twin.safetensors")
    back = compressed_from_tensors(load_file(tmp_path / "twin.safetensors"))  # keys come sorted
    assert len(back) == len(compressed)
    for a, b in zip(compressed, back, strict=True):
        assert list(a.parts) == list(b.parts) == list(big)  # the vectors' key order comes back
        assert isinstance(b.parts["a.weight"], LowRank) and not isinstance(
            b.parts["a.bias"], LowRank
        )
        assert all(torch.equal(a[k], b[k]) for k in a.parts)
        assert b.stored_params == a.stored_params
    flat = compressed_tensors(compressed)
    flat["0:0:a.weight:middle"] = flat.pop("0:0:a.weight:left")
    with pytest.raises(ValueError, match="'0:0:a.weight:middle': the part must be"):
        compressed_from_tensors(flat)
    flat = compressed_tensors(compressed)
    del flat["1:2:b.weight:right"]
    with pytest.raises(ValueError, match="'1:2:b.weight:left' has no right factor"):
        compressed_from_tensors(flat)
