"""LoRA experts, the LLM zoo, Twin on a text stream and the mergekit export, on a tiny Llama."""

import warnings

import pytest
import torch
from conftest import require
from transformers import LlamaConfig, LlamaForCausalLM

from course_lib import export
from course_lib.data.text import TextExample, TextTask
from course_lib.llm_track import (
    LLMZoo,
    build_twin,
    mixed_stream,
    static_stream,
    twin_stream,
)
from course_lib.merging import task_arithmetic, ties_merging
from course_lib.merging.twin import LowRank
from course_lib.models import llm
from course_lib.models.lora import (
    LoraExpert,
    LoraSpec,
    adapted_keys,
    base_state,
    build_experts,
    encode_for_training,
    end_of_turn_id,
    factor_merge,
    load_expert,
    save_expert,
    train_lora,
)
from course_lib.models.vision import build_tokenizer

CHAT = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
WORDS = ["what", "is", "colour", "shape", "of", "sky", "grass", "sun", "ball", "blue", "green"]
WORDS += ["round", "yellow", "answer"]


def tiny_llm(layers=2, seed=0):
    tok = build_tokenizer(WORDS)
    tok.chat_template = CHAT
    tok.padding_side = "left"
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.3,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval(), tok


def tiny_tasks():
    def task(name, qa):
        ex = [TextExample(q, a) for q, a in qa]
        return TextTask(name, {"train": ex * 4, "val": ex, "test": ex}, system="answer")

    return {
        "colour": task("colour", [("what is colour of sky", "blue"), ("what is colour of ball", "blue")]),
        "shape": task("shape", [("what is shape of sun", "round"), ("what is shape of ball", "round")]),
    }  # fmt: skip


SPEC = LoraSpec(rank=2, alpha=4, top_layers=1, lr=3e-2, steps=30, batch_size=4, eval_every=10)


def test_training_labels_only_the_answer_and_end_of_turn():
    model, tok = tiny_llm()
    task = tiny_tasks()["colour"]
    ids, labels, mask = encode_for_training(tok, task, task.examples("val"))
    for i, ex in enumerate(task.examples("val")):
        kept = labels[i][labels[i] != -100].tolist()
        assert kept == tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert mask[i].sum() == (ids[i] != tok.pad_token_id).sum()  # left padding, masked
        assert mask[i, -1] == 1


def test_end_of_turn_comes_from_the_chat_template_not_the_eos_token():
    _, tok = tiny_llm()
    assert end_of_turn_id(tok) == tok.eos_token_id  # CHAT ends a turn with plain text: eos
    tok.add_tokens(["<|end|>"], special_tokens=True)
    tok.chat_template = CHAT.replace("{{ m['content'] }} ", "{{ m['content'] }}<|end|> ")
    end = tok.convert_tokens_to_ids("<|end|>")
    assert end != tok.eos_token_id and end_of_turn_id(tok) == end  # like SmolLM2's <|im_end|>
    task = tiny_tasks()["colour"]
    _, labels, _ = encode_for_training(tok, task, task.examples("val"))
    assert all(row[row != -100][-1] == end for row in labels)  # experts learn to stop there
    tok.eos_token = None
    tok.chat_template = CHAT
    with pytest.raises(ValueError, match="nothing to stop decoding at"):
        end_of_turn_id(tok)


def test_lora_expert_learns_and_its_delta_is_scale_b_a():
    model, tok = tiny_llm()
    task = tiny_tasks()["colour"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():  # a learner's notebook shows every warning: none here
        warnings.simplefilter("error", FutureWarning)
        expert = train_lora(
            model, tok, task, SPEC, evaluate=lambda m: llm.task_accuracy(m, tok, task, "val"),
            progress=False,
        )  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not mutated
    assert expert.history["loss"][-1] < 0.5 * expert.history["loss"][0]
    assert max(expert.history["val_accuracy"]) == 100.0  # the best checkpoint answers both
    keys = adapted_keys(model, SPEC)
    assert sorted(expert.factors) == sorted(keys) and all("layers.1." in k for k in keys)
    for k, (a, b) in expert.factors.items():
        assert a.shape[0] == 2 and b.shape[1] == 2
        torch.testing.assert_close(expert.delta()[k], SPEC.scale * b @ a)
    base = base_state(model, keys)
    with torch.no_grad():  # the merged expert answers like the trained LoRA
        for k, v in expert.state(base).items():
            dict(model.named_parameters())[k].copy_(v)
    assert llm.task_accuracy(model, tok, task, "val") == max(expert.history["val_accuracy"])


def test_delta_equals_peft_merge_and_unload():
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_llm()
    cfg = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False
    )
    pm = get_peft_model(model, cfg)  # random A and B (not zero), so Delta W != 0
    from course_lib.models.lora import _factors

    expert = LoraExpert("t", _factors(pm), 2.0)
    base = {k: v.clone() for k, v in pm.get_base_model().state_dict().items() if "lora" not in k}
    merged = pm.merge_and_unload().state_dict()
    for k, d in expert.delta().items():
        base_key = k.replace(".weight", ".base_layer.weight")
        torch.testing.assert_close(merged[k], base[base_key] + d)


def test_expert_cache_round_trip_and_resume(tmp_path):
    model, tok = tiny_llm()
    tasks = tiny_tasks()
    spec = LoraSpec(rank=2, alpha=4, top_layers=1, lr=3e-2, steps=3, batch_size=2, eval_every=3)
    trained = []
    log = trained.append
    a = build_experts(model, tok, tasks, tmp_path, spec, base_id="tiny", progress=False, log=log)
    assert len(trained) == 2
    (tmp_path / "shape.safetensors").write_bytes(b"corrupt")
    b = build_experts(model, tok, tasks, tmp_path, spec, base_id="tiny", progress=False, log=log)
    assert len(trained) == 3 and "shape" in trained[-1]  # only the corrupted expert retrained
    for t in tasks:
        for k in a[t].factors:
            assert torch.equal(a[t].factors[k][0], b[t].factors[k][0])  # deterministic
    other = LoraSpec(rank=2, alpha=4, top_layers=1, lr=1e-2, steps=3, batch_size=2, eval_every=3)
    build_experts(model, tok, tasks, tmp_path, other, base_id="tiny", progress=False, log=log)
    assert len(trained) == 5  # a changed spec retrains everything
    save_expert(a["colour"], tmp_path / "x.safetensors")
    back = load_expert(tmp_path / "x.safetensors", "colour", a["colour"].scale)
    assert all(torch.equal(back.delta()[k], v) for k, v in a["colour"].delta().items())


def test_factor_merge_is_not_the_merge_of_the_products():
    g = torch.Generator().manual_seed(0)
    e = [
        LoraExpert(str(i), {"w": (torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g))}, 1.0)
        for i in range(2)
    ]  # fmt: skip
    fm = factor_merge(e, scaling=0.5)["w"]
    (a0, b0), (a1, b1) = e[0].factors["w"], e[1].factors["w"]
    torch.testing.assert_close(fm, 0.25 * (b0 @ a0 + b1 @ a1 + b0 @ a1 + b1 @ a0))
    assert not torch.allclose(fm, 0.5 * (b0 @ a0 + b1 @ a1))
    with pytest.raises(ValueError, match="at least one"):
        factor_merge([])


def test_lora_spec_and_state_errors_name_the_problem():
    with pytest.raises(ValueError, match="LoraSpec.rank"):
        LoraSpec(rank=0)
    with pytest.raises(ValueError, match="LoraSpec.lr"):
        LoraSpec(lr=0.0)
    e = LoraExpert("t", {"w": (torch.zeros(2, 3), torch.zeros(4, 2))}, 1.0)
    with pytest.raises(ValueError, match="'w' is not a weight"):
        e.state({})
    with pytest.raises(ValueError, match=r"'w'.*\(4, 3\).*\(3, 4\)"):
        e.state({"w": torch.zeros(3, 4)})


def train_tiny_zoo(model, tok) -> LLMZoo:
    """One LoRA expert per tiny task on ``model`` (wherever it lives), as an LLMZoo."""
    tasks = tiny_tasks()
    loras = {
        t: train_lora(
            model, tok, task, SPEC, evaluate=lambda m, task=task: llm.task_accuracy(m, tok, task, "val"),
            progress=False,
        )
        for t, task in tasks.items()
    }  # fmt: skip
    base = base_state(model, adapted_keys(model, SPEC))
    experts = {t: e.state(base) for t, e in loras.items()}
    return LLMZoo("mini", model, tok, tasks, SPEC, loras, base, experts)


@pytest.fixture(scope="module")
def tiny_zoo():
    return train_tiny_zoo(*tiny_llm())


def test_zoo_evaluates_states_and_restores_the_base(tiny_zoo):
    zoo = tiny_zoo
    before = {k: v.clone() for k, v in zoo.model.state_dict().items()}
    acc = {t: zoo.evaluate(zoo.experts[t], "test", [t])[t] for t in zoo.task_names}
    assert acc == {"colour": 100.0, "shape": 100.0}
    assert all(torch.equal(before[k], v) for k, v in zoo.model.state_dict().items())
    assert zoo.evaluate(None)["colour"] < 100.0  # the base does not know the answers
    merged = ties_merging(zoo.pretrained, zoo.finetuned(), density=0.5)  # the engine runs as is
    assert set(zoo.evaluate(merged)) == {"colour", "shape"}
    with pytest.raises(ValueError, match="limit must be an integer >= 1"):  # [:-1] dropped one
        zoo.evaluate(None, limit=-1)
    with pytest.raises(ValueError, match="not one of the LLM's adapted weights"):
        zoo.evaluate({"lm_head.weight": torch.zeros(1)})


def test_zoo_remembers_accuracies_of_the_same_weights(tiny_zoo, tmp_path, monkeypatch):
    from course_lib import config, evalcache

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(tiny_zoo, "world", "tiny llm world")  # a loaded zoo carries its world
    decoded = []
    answers = LLMZoo.answers
    monkeypatch.setattr(
        LLMZoo, "answers", lambda self, *a, **k: decoded.append(a[1]) or answers(self, *a, **k)
    )
    merged = task_arithmetic(tiny_zoo.pretrained, tiny_zoo.finetuned(), scaling=0.5)
    with evalcache.using("on"):
        first = tiny_zoo.evaluate(merged, "val")
        assert decoded == ["colour", "shape"]
        again = {k: v.clone() for k, v in merged.items()}  # equal bytes, another object
        assert tiny_zoo.evaluate(again, "val") == first and len(decoded) == 2  # served
        tiny_zoo.evaluate(merged, "val", limit=1)  # fewer questions: another number
        assert len(decoded) == 4
        tiny_zoo.evaluate(task_arithmetic(tiny_zoo.pretrained, tiny_zoo.finetuned(), 0.6), "val")
        assert len(decoded) == 6


def test_twin_remembers_router_features_and_answers(tiny_zoo, tmp_path, monkeypatch):
    from course_lib import config, evalcache
    from course_lib import llm_track as track

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(tiny_zoo, "world", "tiny llm world")
    calls = {"features": 0, "answers": 0, "svd": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(track, "_pooled_batches", counting("features", track._pooled_batches))
    monkeypatch.setattr(llm, "generate", counting("answers", llm.generate))
    monkeypatch.setattr(track, "compress", counting("svd", track.compress))
    stream = mixed_stream(tiny_zoo, "test")

    def run():
        twin = build_twin(tiny_zoo, rank_ratio=0.5, epochs=50, progress=False)
        return twin, twin_stream(tiny_zoo, twin, stream, mode="input", progress=False)

    with evalcache.using("on"):
        twin, first = run()
        computed = dict(calls)
        # train and val prompts per task; the stream's (here the val questions again) are served
        assert computed == {"features": 4, "answers": 4, "svd": 1}  # a merge per stream item
        served, again = run()
        assert calls == computed  # served: no forward pass, no SVD, no decoding
        assert (again.accuracy, again.confidence) == (first.accuracy, first.confidence)
        for a, b in zip(twin.compressed, served.compressed, strict=True):
            assert list(a.parts) == list(b.parts) and a.stored_params == b.stored_params
            assert any(isinstance(p, LowRank) for p in b.parts.values())
            assert all(torch.equal(a[k], b[k]) for k in a.parts)
        track.twin_stream(tiny_zoo, build_twin(tiny_zoo, rank_ratio=1.0, progress=False), stream)
        assert calls["svd"] == 2 and calls["answers"] > computed["answers"]  # other weights
    with tiny_zoo.using(tiny_zoo.experts["colour"]), pytest.raises(ValueError, match="base model"):
        track.stream_features(tiny_zoo, stream)  # a merged state is in the model


def test_router_features_are_keyed_by_the_base_weights(tiny_zoo, tmp_path, monkeypatch):
    """Another base model under the same world (the hub's SmolLM2 instead of the dequantized
    one, or another hub revision) must not be served the first one's features."""
    import dataclasses

    from course_lib import config, evalcache
    from course_lib import llm_track as track

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(tiny_zoo, "world", "tiny llm world")
    calls = []
    pooled = track._pooled_batches
    monkeypatch.setattr(track, "_pooled_batches", lambda *a: calls.append(1) or pooled(*a))
    other = {k: v + 1e-3 for k, v in tiny_zoo.pretrained.items()}
    with evalcache.using("on"):
        first = track.pooled_features(tiny_zoo, "colour", "val")
        assert torch.equal(track.pooled_features(tiny_zoo, "colour", "val"), first)
        assert len(calls) == 1  # served
        track.pooled_features(dataclasses.replace(tiny_zoo, pretrained=other), "colour", "val")
        assert len(calls) == 2


def test_zoo_of_non_layer_weights_is_a_clear_error(tiny_zoo):
    z = tiny_zoo
    head = {"lm_head.weight": z.model.lm_head.weight.detach().clone()}
    with pytest.raises(ValueError, match="'lm_head.weight' is not a decoder-layer weight"):
        LLMZoo("mini", z.model, z.tok, z.tasks, z.spec, z.loras, head, {})


def test_twin_routes_a_mixed_stream(tiny_zoo):
    zoo = tiny_zoo
    twin = build_twin(zoo, rank_ratio=1.0, epochs=300, progress=False)
    assert twin.router_val_accuracy == 100.0  # the two tasks' prompts are easy to tell apart
    stream = mixed_stream(zoo, "test")
    assert sorted(s.task for s in stream) == ["colour"] * 2 + ["shape"] * 2
    sharp = {"temperature": 0.01, "progress": False}  # ~one-hot weights: theta* + v_t = expert t
    group = twin_stream(zoo, twin, stream, mode="group", **sharp)
    single = twin_stream(zoo, twin, stream, mode="input", **sharp)
    assert group.accuracy == single.accuracy == {"colour": 100.0, "shape": 100.0}
    assert group.router_accuracy == 100.0 and (group.merges, single.merges) == (2, 4)
    few = twin_stream(zoo, twin, [s for s in stream if s.task == "shape"], **sharp)
    assert set(few.accuracy) == {"shape"}  # a task absent from the stream is not scored
    ta = static_stream(zoo, task_arithmetic(zoo.pretrained, zoo.finetuned(), 0.3), stream)
    assert set(ta) == {"colour", "shape"}
    with pytest.raises(ValueError, match="mode"):
        twin_stream(zoo, twin, stream, mode="token")


# ----------------------------------------------------------------------------- mergekit


@pytest.mark.parametrize("method", export.SUPPORTED)
def test_mergekit_configs_validate_with_mergekit(method):
    require("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration

    text = export.mergekit_yaml(method, "base", ["e1", "e2"], scaling=0.7, density=0.3)
    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    assert len(cfg.models) == 2
    expected = {"average": "linear", "task_arithmetic": "task_arithmetic", "ties": "ties"}
    assert cfg.merge_method == expected.get(method, "dare_linear")


def test_mergekit_task_arithmetic_matches_ours(tmp_path):
    """mergekit itself merges two saved tiny Llamas; the result equals our task arithmetic."""
    require("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    base, tok = tiny_llm(seed=0)
    dirs = []
    for i, seed in enumerate((0, 1, 2)):
        m, _ = tiny_llm(seed=0)
        if i:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        d = tmp_path / f"m{i}"
        m.save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    cfg = export.mergekit_config(
        "task_arithmetic", str(dirs[0]), [str(dirs[1]), str(dirs[2])], scaling=0.4
    )
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(cfg))),
        str(tmp_path / "out"),
        MergeOptions(copy_tokenizer=False, lazy_unpickle=False),
    )
    out = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        out.update(load_file(str(f)))
    sds = [LlamaForCausalLM.from_pretrained(d).state_dict() for d in dirs]
    ours = task_arithmetic(sds[0], sds[1:], scaling=0.4)
    checked = 0
    for k, v in out.items():
        torch.testing.assert_close(v, ours[k], atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked >= 10


def test_mergekit_export_refuses_what_it_cannot_express():
    with pytest.raises(ValueError, match="PCB-Merging .* no mergekit method"):
        export.mergekit_config("pcb", "b", ["e"])
    with pytest.raises(ValueError, match="Twin-Merging routes every input"):
        export.mergekit_config("twin", "b", ["e"])
    with pytest.raises(ValueError, match="unknown method 'slerp'"):
        export.mergekit_config("slerp", "b", ["e"])
    with pytest.raises(ValueError, match="density"):
        export.mergekit_config("ties", "b", ["e"], density=0.0)


def test_cached_frozen_prefix_gives_the_same_loss_as_the_full_model():
    from course_lib.models.lora import answer_loss, cache_frozen_prefix, top_layers_only

    model, tok = tiny_llm(layers=3)
    task = tiny_tasks()["colour"]
    ids, labels, mask = encode_for_training(tok, task, task.examples("train"))
    full = answer_loss(model, ids, labels, mask)
    prefix = cache_frozen_prefix(model, ids, mask, first=2)
    with top_layers_only(model, 2):
        assert len(model.model.layers) == 1
        top = answer_loss(model, ids, labels, mask, prefix)
    assert len(model.model.layers) == 3  # restored
    torch.testing.assert_close(top, full)


def test_run_llm_all_fills_every_row(tiny_zoo):
    from course_lib.llm_track import llm_results_markdown, run_llm_all

    res = run_llm_all(tiny_zoo, progress=False)
    assert list(res.absolute) == [
        "base model", "task arithmetic", "DARE (p=0.9) + TA", "TIES-Merging", "PCB-Merging",
        "Twin-Merging", "LoRA experts",
    ]  # fmt: skip
    assert res.experts == {"colour": 100.0, "shape": 100.0}
    assert set(res.chosen) == {"task arithmetic", "TIES-Merging", "PCB-Merging"}
    text = llm_results_markdown(res)
    assert "| LoRA experts | 100.0 | 100.0 | 100.0 |" in text and "router accuracy" in text
    n = {t: len(tiny_zoo.tasks[t].examples("test")) for t in tiny_zoo.task_names}
    assert res.questions == n and f"(colour {n['colour']}, shape {n['shape']})" in text


# ----------------------------------------------------------------------------- greedy decoding


def _hf_greedy(model, tok, prompts, max_new_tokens, eos):
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
        eos_token_id=eos,
    )  # fmt: skip
    return out[:, enc["input_ids"].shape[1] :]


def test_greedy_decode_gives_generates_tokens_and_reuses_the_frozen_layers():
    model, tok = tiny_llm(layers=3)
    prompts = ["what is colour of sky", "ball", "what is shape of the round yellow sun"]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    args = (model, enc["input_ids"], enc["attention_mask"])
    free = llm.greedy_decode(*args, max_new_tokens=6, eos_token_id=-1, pad_token_id=0)
    assert torch.equal(free, _hf_greedy(model, tok, prompts, 6, eos=[-1]))
    # an end of turn half-way through row 0: that row is padded after it, the others go on
    p = next(i for i in range(2, 6) if int(free[0, i]) not in free[0, :i].tolist())
    eos = int(free[0, p])
    ours = llm.greedy_decode(*args, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, _hf_greedy(model, tok, prompts, 6, eos=eos))
    assert ours[0, p] == eos and (ours[0, p + 1 :] == 0).all()

    frozen = llm.FrozenLayers(model, first=2)
    key = tuple(prompts)
    kw = {"max_new_tokens": 6, "eos_token_id": -1, "pad_token_id": 0, "prompts": key}
    assert torch.equal(llm.greedy_decode(*args, frozen=frozen, **kw), free)  # kept
    kept = [t.clone() for kv in frozen.get(key)[0] for t in kv]
    with torch.no_grad():  # a "merge": only the layer above the frozen ones changes
        for p in model.model.layers[2].parameters():
            p.add_(0.3 * torch.randn_like(p))
    reused = llm.greedy_decode(*args, frozen=frozen, **kw)
    assert (frozen.misses, frozen.hits) == (1, 1)
    assert torch.equal(
        reused, llm.greedy_decode(*args, max_new_tokens=6, eos_token_id=-1, pad_token_id=0)
    )
    assert not torch.equal(reused, free)  # the top layer did change the answers
    after = [t for kv in frozen.get(key)[0] for t in kv]
    assert all(torch.equal(a, b) for a, b in zip(kept, after, strict=True))  # never written
    with pytest.raises(ValueError, match="another model"):
        llm.greedy_decode(tiny_llm(layers=3)[0], *args[1:], frozen=frozen, **kw)
    with pytest.raises(ValueError, match="1..2"):
        llm.FrozenLayers(model, first=3)


def test_llm_zoo_reuses_the_layers_below_the_adapted_ones(tiny_zoo):
    zoo = tiny_zoo
    assert zoo.frozen.first == 1  # SPEC adapts the top layer of two
    before = zoo.frozen.hits
    first = zoo.evaluate(zoo.experts["colour"], "test")
    assert zoo.evaluate(zoo.experts["colour"], "test") == first
    assert zoo.frozen.hits >= before + 2  # the second evaluation ran the top layer only
