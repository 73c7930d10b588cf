"""The GPU path: the same code on a CUDA device gives what it gives on the CPU.

CI has no GPU, so these are skipped there; run them on a machine with one
(``python -m pytest tests/test_gpu.py``). They were written after the first run of the course on
an H100 found that ``eval.predictions`` moved the inputs but not the zero-shot head.
"""

from __future__ import annotations

import pytest
import torch
from test_llm_track import tiny_llm, train_tiny_zoo
from test_zoo import TINY

from course_lib.experiments import features
from course_lib.llm_track import build_twin, mixed_stream, twin_stream
from course_lib.merging import ties_merging
from course_lib.models.zoo import build_zoo, load_zoo
from course_lib.train import finetune

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def vision_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    build_zoo(TINY, root, progress=False, log=lambda s: None)
    return load_zoo("mini", cfg=TINY, root=root, build=False, progress=False)


def on(device: str, fn, monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", device)
    return fn()


def test_vision_evaluation_and_features_match_the_cpu(vision_zoo, monkeypatch):
    z = vision_zoo
    merged = ties_merging(z.pretrained, z.finetuned(), density=0.5)
    for state in (z.pretrained, merged):
        gpu = on("cuda", lambda s=state: z.evaluate(s, "test"), monkeypatch)
        cpu = on("cpu", lambda s=state: z.evaluate(s, "test"), monkeypatch)
        one_image = 100.0 / 16  # TINY has 16 test images per task; float noise may flip one
        assert gpu == pytest.approx(cpu, abs=one_image + 1e-9)
    name = z.task_names[0]
    f_gpu = on("cuda", lambda: features(z, merged, name, "val"), monkeypatch)
    f_cpu = on("cpu", lambda: features(z, merged, name, "val"), monkeypatch)
    assert f_gpu.device.type == "cpu"  # handed back on the CPU, where the router trains
    torch.testing.assert_close(f_gpu, f_cpu, atol=1e-3, rtol=1e-3)


def test_vision_finetuning_runs_on_the_gpu(vision_zoo):
    z = vision_zoo
    name = z.task_names[0]
    state, hist = finetune(z.classifier(name), z.tasks[name], TINY.finetune, device="cuda")
    assert all(v.device.type == "cpu" for v in state.values())  # saved like a CPU-built expert
    assert set(state) == set(z.pretrained) and len(hist.val_accuracy) == TINY.finetune.epochs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llm_lora_decoding_merging_and_twin_on_the_gpu(dtype):
    model, tok = tiny_llm()
    model = model.to("cuda", dtype)  # float32 is the default; bfloat16 for large models
    zoo = train_tiny_zoo(model, tok)
    for e in zoo.loras.values():  # the factors come back as float32 CPU tensors, whatever the model
        assert all(a.device.type == b.device.type == "cpu" for a, b in e.factors.values())
        assert all(a.dtype == b.dtype == torch.float32 for a, b in e.factors.values())
        assert max(e.history["val_accuracy"]) == 100.0
    assert {t: zoo.evaluate(zoo.experts[t], "test", [t])[t] for t in zoo.tasks} == {
        "colour": 100.0,
        "shape": 100.0,
    }
    twin = build_twin(zoo, rank_ratio=1.0, epochs=300, progress=False)
    sharp = {"temperature": 0.01, "progress": False}
    result = twin_stream(zoo, twin, mixed_stream(zoo, "test"), mode="group", **sharp)
    assert result.accuracy == {"colour": 100.0, "shape": 100.0}
