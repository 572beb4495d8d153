"""Tests on the shipped embedded model (data/embedded); skipped until the trained weights exist."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dgq_utils.world import scenes as W

EMB = Path(__file__).resolve().parents[1] / "data" / "embedded"
needs_weights = pytest.mark.skipif(
    not (EMB / "pipeline" / "model_index.json").exists() or not (EMB / "evaluator" / "model.safetensors").exists(),
    reason="data/embedded is absent: train it with scripts/train_embedded.py (see data/embedded/README.md)",
)


@pytest.fixture(scope="module")
def evaluator():
    from dgq_utils.world.evaluator import AttributeEvaluator

    return AttributeEvaluator.load(EMB / "evaluator")


@needs_weights
def test_shipped_artefacts_fit_the_size_budget():
    total = sum(f.stat().st_size for f in EMB.rglob("*") if f.is_file())
    assert total <= 32e6, f"data/embedded is {total / 1e6:.1f} MB (budget 32 MB)"
    for f in EMB.rglob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(f), "pt") as sf:
            k = next(iter(sf.keys()))
            assert sf.get_tensor(k).dtype == torch.float16, f


@needs_weights
def test_evaluator_accuracy_on_fresh_real_images(evaluator):
    from dgq_utils.world.evaluator import real_accuracy

    for split in ("test", "heldout"):
        acc = real_accuracy(evaluator, W.sample_scenes(64, split, seed=12345))
        assert acc["all_labels"] >= 0.95, (split, acc)


@needs_weights
def test_load_pipeline_offline_and_generate(monkeypatch):
    import socket

    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from dgq_utils.model.loading import load_pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the embedded model must load without any network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    pipe = load_pipeline()
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.vae.config.scaling_factor != 0.18215          # measured on this world, SD-style
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a large red circle on the left", "a small blue square above a large yellow cross"],
               num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (2, 64, 64, 3) and 0 <= out.min() and out.max() <= 1 and out.std() > 0.01
    again = StableDiffusionPipeline.from_pretrained(str(EMB / "pipeline"), local_files_only=True)
    assert again.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def _model_card_snippet(marker: str) -> str:
    import re

    blocks = re.findall(r"```python\n(.*?)```", (EMB / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert found, f"the model card has no python snippet using {marker}"
    return found[0]


@needs_weights
@pytest.mark.parametrize("cls_name", ["DiffusionPipeline", "StableDiffusionPipeline"])
def test_plain_diffusers_loading_from_the_model_card(cls_name, monkeypatch):
    """The model card's plain diffusers snippet runs as written (no dtype argument): one dtype everywhere."""
    import diffusers
    from PIL import Image

    monkeypatch.chdir(EMB.parents[1])                   # the snippet's path is relative to the repository root
    code = _model_card_snippet("DiffusionPipeline.from_pretrained")
    code = code.replace("DiffusionPipeline", cls_name).replace(f"Stable{cls_name}", cls_name)
    code = code.replace("num_inference_steps=25", "num_inference_steps=3")  # small and fast; same code path
    scope: dict = {}
    exec(compile(code, "data/embedded/README.md", "exec"), scope)
    pipe, image = scope["pipe"], scope["image"]
    assert isinstance(pipe, getattr(diffusers, cls_name))
    dtypes = {n: next(getattr(pipe, n).parameters()).dtype for n in ("unet", "vae", "text_encoder")}
    assert set(dtypes.values()) == {torch.float32}, dtypes
    assert isinstance(image, Image.Image) and image.size == (64, 64)


@needs_weights
def test_small_clip_prefers_the_true_caption():
    from dgq_utils.world.clip import clip_score, load_world_clip

    model, pre, tok = load_world_clip(EMB / "clip")
    s = W.sample_scenes(16, "test", seed=3, p_two=0.0)
    img = W.render(s)
    caps = W.captions(s)
    wrong = [c.replace(W.COLOUR_NAMES[int(s.colour[i, 0])],
                       W.COLOUR_NAMES[(int(s.colour[i, 0]) + 3) % len(W.COLOUR_NAMES)]) for i, c in enumerate(caps)]
    right, bad = clip_score(img, caps, model, pre, tok), clip_score(img, wrong, model, pre, tok)
    assert (right > bad).float().mean() >= 0.9


@needs_weights
def test_torch_fidelity_extractor_on_real_images():
    pytest.importorskip("torch_fidelity")
    from dgq_utils.world.fidelity import fidelity_metrics

    a = W.render(W.sample_scenes(300, "test", seed=1))
    b = W.render(W.sample_scenes(300, "val", seed=1))
    same = fidelity_metrics(a, b, EMB / "evaluator", kid_subset_size=100)
    blurred = torch.nn.functional.avg_pool2d(b, 7, stride=1, padding=3, count_include_pad=False)
    off = fidelity_metrics(a, blurred, EMB / "evaluator", kid_subset_size=100)
    # FID is biased upwards at n=300 (256-d features); KID is unbiased
    assert 0 <= same["fid"] < off["fid"] and abs(same["kid_mean"]) < off["kid_mean"] / 5
    assert same["isc_mean"] > 5


@needs_weights
def test_committed_evaluation_shows_the_quality_bar():
    m = json.loads((EMB / "metrics.json").read_text())
    one = m["quality"]["test_one_object"]["one_object"]
    assert one["n"] >= 500 and one["whole"] >= 0.8 and one["colour"] >= 0.9 and one["shape"] >= 0.9
    assert m["cpu_generation"]["s_per_image_min"] > 0
    assert "phenomena" in m and m["evaluator_accuracy"]["test"]["all_labels"] >= 0.98


@pytest.mark.slow
@needs_weights
def test_fp_alignment_on_a_few_one_object_prompts(evaluator):
    from dgq_utils.model.loading import load_pipeline
    from dgq_utils.world.quality import generate

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    s = W.sample_scenes(16, "test", seed=101, p_two=0.0)
    ims = generate(pipe, W.captions(s), batch_size=16)
    assert evaluator.score(ims, s)["whole"].float().mean() >= 0.6


@needs_weights
def test_world_tokenizer_rebuilds_the_shipped_vocabulary(tmp_path):
    """The shipped model's token ids come from the shared word-level vocabulary writer: rebuilding it gives the
    same files, so the model's embedding rows keep their meaning."""
    from dgq_utils.world.text import build_world_tokenizer

    build_world_tokenizer(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (EMB / "pipeline" / "tokenizer" / name).read_bytes(), name
