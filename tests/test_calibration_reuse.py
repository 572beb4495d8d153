"""Work reused between calibrations: the observation passes (shared by recipes that observe the same thing) and
the K-means fits (kept in a folder across processes). Reuse must give bit-identical calibrated states."""
import numpy as np
import pytest
import torch

from dgq_utils.calibrate import observation_memo
from dgq_utils.config import SamplerSettings, get_preset
from dgq_utils.core import kmeans
from dgq_utils.quantize.pipeline import dequantize_pipeline, get_quant_state, quantize_pipeline
from dgq_utils.testing.tiny import build_tiny_pipeline

PROMPTS = ["a red car parked in the city", "a blue house near a river"]
S = SamplerSettings(num_inference_steps=2, batch_size=2, height=32, width=32)


@pytest.fixture
def pipe():
    return build_tiny_pipeline(seed=0)


def _params(pipe, recipe):
    """Every quantizer parameter tensor of ``pipe`` after calibrating ``recipe`` (name -> tensor)."""
    rep = quantize_pipeline(pipe, recipe, PROMPTS, S, 0, progress=False)
    qs = get_quant_state(pipe)
    out = {}
    for q in qs.act_quantizers():
        for i, (s, z) in q.params.items():
            out[f"{q.name}.{i}.s"], out[f"{q.name}.{i}.z"] = s.clone(), z.clone()
    for pq in qs.prob_quantizers():
        for i, m in pq.static.items():
            out[f"{pq.name}.{i}.static"] = m.clone()
    reused = rep.calibration["observation_reused"]
    dequantize_pipeline(pipe)
    return out, reused


def _same(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("first, second", [("dgq-w8a8", "dgq-w4a8"), ("baseline-w8a8", "baseline-w8a6")])
def test_reused_observation_gives_the_same_state(pipe, first, second):
    observation_memo.clear()
    fresh, was_reused = _params(pipe, second)  # observed itself
    assert was_reused is False
    observation_memo.clear()
    _params(pipe, first)
    reused, was_reused = _params(pipe, second)  # from the first recipe's observation
    assert was_reused is True
    _same(fresh, reused)


def test_what_changes_the_observation_changes_the_key(pipe):
    observation_memo.clear()
    base = get_preset("dgq-w8a6")
    assert _params(pipe, base)[1] is False
    assert _params(pipe, base.replace(name="x-uniform", attention={"quantizer": "uniform"}))[1] is True
    assert _params(pipe, base.replace(name="x-no-start", attention={"keep_start_fp": False,
                                                                    "keep_start_key_fp": False}))[1] is False
    assert _params(pipe, base.replace(name="x-shared", per_timestep=False))[1] is False
    # a static softmax scale records maxima a per-prompt one does not: another observation
    observation_memo.clear()
    assert _params(pipe, base)[1] is False
    static = base.replace(name="x-static", attention={"scale": "static"})
    fresh, reused = _params(pipe, static)
    assert reused is False and any(k.endswith(".static") for k in fresh)
    again, reused = _params(pipe, static.replace(name="x-static-2"))  # restored maxima: the same scales
    assert reused is True
    _same(fresh, again)
    # the official upstream observes a partly quantized model: never remembered
    observation_memo.clear()
    assert _params(pipe, "dgq-official-w8a6")[1] is False
    assert _params(pipe, "dgq-official-w8a6")[1] is False


def test_changed_weights_are_a_new_observation(pipe):
    observation_memo.clear()
    assert _params(pipe, "dgq-w8a8")[1] is False
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1e-3)
    assert _params(pipe, "dgq-w8a8")[1] is False


def test_kmeans_store_answers_a_new_process_bit_identically(tmp_path):
    rng = np.random.default_rng(0)
    jobs = [(rng.normal(size=(40, 2)).astype(np.float32), 4, 0) for _ in range(5)]
    kmeans.clear_memo()
    kmeans.set_store(tmp_path)
    try:
        first = kmeans.kmeans_many(jobs)
        assert len(list(tmp_path.glob("*.npz"))) == 1
        kmeans.clear_memo()  # as in another process: nothing in memory, the folder answers
        kmeans.set_store(tmp_path)
        calls = []
        real = kmeans.kmeans_chunk
        kmeans.kmeans_chunk = lambda chunk: calls.append(len(chunk)) or real(chunk)
        try:
            again = kmeans.kmeans_many(jobs + [(rng.normal(size=(30, 2)).astype(np.float32), 3, 1)])
        finally:
            kmeans.kmeans_chunk = real
        assert calls == [1]  # only the new job was fitted
        for a, b in zip(first, again):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        (tmp_path / "broken.npz").write_bytes(b"not a zip")  # a damaged file is ignored
        kmeans.clear_memo()
        kmeans.set_store(tmp_path)
        assert all(np.array_equal(a, b) for a, b in zip(first, kmeans.kmeans_many(jobs)))
    finally:
        kmeans.set_store(None)
        kmeans.clear_memo()
