"""run_comparison end to end on the tiny pipeline with the real quantization engine and stand-in metric models:
one call → tidy table with CIs; killed mid-run → the rerun finishes with nothing lost or duplicated."""
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from dgq_utils.evaluate import metrics as M
from dgq_utils.evaluate.compare import Reference, run_comparison
from dgq_utils.config import SamplerSettings
from dgq_utils.generate.images import load_manifest

PROMPTS = ["a red car parked in the city", "a blue house near a river", "a horse in the snow",
           "an old clock near a white cup", "a picture of a dog", "a yellow flower in a green forest"]
CALIB = ["a small bird flying over the beach", "a painting of a forest and a river"]
RECIPES = ["baseline-w8a8", "dgq-w8a6"]
SETTINGS = SamplerSettings(num_inference_steps=2, batch_size=3, height=32, width=32)
METRICS = ["fid", "kid", "isc", "clip_score", "alignment", "psnr", "ssim", "lpips"]


def factory():
    from dgq_utils.testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def clip_scorer():
    from dgq_utils.testing.tiny import build_tiny_clip

    return M.ClipScorer.from_transformers(*build_tiny_clip())


def evaluator(images, prompts):
    """Stand-in attribute classifier: 'bright' = mean intensity above the median of a fixed threshold."""
    x = images.float().mean((1, 2, 3)).numpy()
    bright = x > 120
    warm = images[:, 0].float().mean((1, 2)).numpy() > images[:, 2].float().mean((1, 2)).numpy()
    return pd.DataFrame({"bright": bright, "warm": warm, "caption": bright & warm,
                         "held_out": np.array(["dog" in p for p in prompts])})


def _run(out, clip_scorer, model=factory, **kw):
    real = (torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    args = dict(recipes=RECIPES, prompts=PROMPTS, seeds=[0], calibration_prompts=CALIB, metrics=METRICS,
                settings=SETTINGS, reference=Reference(images=real), extractor=M.PIXELS_DEBUG,
                clip_scorer=clip_scorer, alignment_evaluator=evaluator, n_boot=200, n_boot_set=20, progress=False)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_comparison(model, out_dir=out, **args)


def _files(out):
    tables = {p.name: pd.read_csv(p) for p in sorted(out.glob("*.csv"))}
    tables.update({f"per_image/{p.name}": pd.read_csv(p) for p in sorted((out / "per_image").glob("*.csv"))})
    manifests = {p.parent.name.split("-")[0] + p.parent.name[-4:]: load_manifest(p.parent).drop(columns=["model_id"])
                 for p in sorted((out / "images").glob("*/manifest.jsonl"))}
    return tables, manifests


class Killed(Exception):
    pass


def test_one_call_table_and_resume_after_kill(tmp_path, clip_scorer):
    clean = _run(tmp_path / "clean", clip_scorer)
    t = clean.table
    assert list(dict.fromkeys(t["recipe"])) == ["fp", *RECIPES]
    fp_metrics = set(t.loc[t.recipe == "fp", "metric"])
    assert {"fid", "kid", "isc", "clip_score", "alignment_caption", "alignment_caption_heldout"} <= fp_metrics
    assert not fp_metrics & {"psnr", "ssim", "lpips"}  # fidelity to FP is not measured for FP itself
    q = t[t.recipe == "dgq-w8a6"].set_index("metric")
    assert {"psnr", "ssim", "lpips", "fid"} <= set(q.index)
    assert np.isnan(q.loc["lpips", "value"]) and "backbone weights" in q.loc["lpips", "note"]
    finite = t.dropna(subset=["value"])
    assert (finite.n > 0).all()
    ci = finite.dropna(subset=["ci_low"])
    assert (ci.ci_low <= ci.ci_high + 1e-12).all() and len(ci) >= len(finite) - 4
    assert set(clean.paired["recipe"]) == set(RECIPES)
    assert {"fid", "clip_score", "alignment_caption"} <= set(clean.paired["metric"])
    assert clean.paired["p_value"].dropna().between(0, 1).all()
    sig = clean.paired["significant"].astype(bool)
    assert (sig == ((clean.paired.ci_low > 0) | (clean.paired.ci_high < 0))).all()
    assert (tmp_path / "clean" / "results.md").read_text().count("dgq-w8a6") >= 2
    assert len(list((tmp_path / "clean" / "quant_states").glob("*.safetensors"))) == 2
    wide = clean.report()
    assert list(wide["recipe"]) == ["fp", *RECIPES] and "[" in wide.loc[0, "clip_score"]

    # killed while generating the last recipe (after 2 of its 6 images); a single pipeline object this time
    count = {"n": 0}

    def kill(rec):
        if rec["recipe_name"] == "dgq-w8a6":
            count["n"] += 1
            if count["n"] == 2:
                raise Killed

    pipe = factory()
    with pytest.raises(Killed):
        _run(tmp_path / "run", clip_scorer, model=pipe, on_image=kill)
    partial = pd.read_csv(tmp_path / "run" / "results.csv")
    assert list(dict.fromkeys(partial["recipe"])) == ["fp", "baseline-w8a8"]  # a valid partial table
    from dgq_utils.quantize.pipeline import is_quantized

    if is_quantized(pipe):  # the kill left it quantized; a rerun must start from FP
        from dgq_utils.quantize.pipeline import dequantize_pipeline

        dequantize_pipeline(pipe)
    resumed = _run(tmp_path / "run", clip_scorer, model=pipe)
    assert resumed.generations["fp"].generated == 0 and resumed.generations["baseline-w8a8"].generated == 0
    # the kill hit the first batch of 3 before its manifest part was written: all 6 are (re)generated
    assert resumed.generations["dgq-w8a6"].generated == 6
    a, b = _files(tmp_path / "clean"), _files(tmp_path / "run")
    assert a[0].keys() == b[0].keys() and a[1].keys() == b[1].keys()
    for k in a[0]:
        pd.testing.assert_frame_equal(a[0][k], b[0][k], check_exact=False, rtol=1e-9, obj=k)
    for k in a[1]:
        pd.testing.assert_frame_equal(a[1][k], b[1][k], obj=k)
    assert not is_quantized(pipe)

    # a third call reuses everything: no calibration, no generation, same table
    again = _run(tmp_path / "run", clip_scorer)
    assert all(g.generated == 0 for g in again.generations.values())
    pd.testing.assert_frame_equal(again.table, resumed.table)


def test_corrupt_calibrated_state_is_recalibrated(tmp_path, clip_scorer):
    out = tmp_path / "o"
    kw = dict(recipes=["dgq-w8a8"], metrics=["psnr"], prompts=PROMPTS[:3])
    first = _run(out, clip_scorer, **kw)
    state = next((out / "quant_states").glob("*.safetensors"))
    state.write_bytes(b"not a safetensors file")
    for d in (out / "images").glob("dgq-w8a8-*"):  # force regeneration so the state is needed
        for p in (d / "images").iterdir():
            p.write_bytes(b"corrupt")
    (out / "results.csv").unlink()
    with pytest.warns(UserWarning, match="recalibrating"):
        second = run_comparison(factory, out_dir=out, seeds=[0], calibration_prompts=CALIB, settings=SETTINGS,
                                progress=False, n_boot=200, **kw)
    assert second.generations["dgq-w8a8"].generated == 3
    pd.testing.assert_frame_equal(first.table, second.table)


def test_fid_to_fp_reference(tmp_path, clip_scorer):
    res = _run(tmp_path, clip_scorer, recipes=["baseline-w8a8"], prompts=PROMPTS[:4], metrics=["fid", "kid"],
               reference="fp")
    t = res.table.set_index(["recipe", "metric"])
    assert set(t.index) == {("baseline-w8a8", "fid"), ("baseline-w8a8", "kid")}  # FP vs itself is not reported
    assert "vs FP images" in t.loc[("baseline-w8a8", "fid"), "note"] and t.loc[("baseline-w8a8", "fid"), "value"] > 0


def test_bad_input(tmp_path, clip_scorer, monkeypatch):
    with pytest.raises(ValueError, match="disjoint"):
        _run(tmp_path, clip_scorer, calibration_prompts=[PROMPTS[0]])
    with pytest.raises(ValueError, match="prompt list is empty"):
        _run(tmp_path, clip_scorer, prompts=[])
    with pytest.raises(ValueError, match="valid metrics"):
        _run(tmp_path, clip_scorer, metrics=["fid", "aesthetics"])
    with pytest.raises(ValueError, match="unknown feature extractor 'dino'.*valid:"):
        _run(tmp_path, clip_scorer, extractor="dino")
    with pytest.raises(ValueError, match="needs clip_scorer"):
        _run(tmp_path, None)
    with pytest.raises(ValueError, match="need reference"):
        _run(tmp_path, clip_scorer, reference=None)
    with pytest.raises(ValueError, match="calibration_prompts"):
        _run(tmp_path, clip_scorer, calibration_prompts=[])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="weights-inception"):
        _run(tmp_path, clip_scorer, extractor=M.INCEPTION)
    assert not (tmp_path / "images").exists()  # every check fails before anything is generated


# ------------------------------------------------------------------------------------------ embedded world wiring
def _build_random_embedded(root):
    """The layout of data/embedded (pipeline/, clip/, evaluator/) with the world's architectures, untrained."""
    from diffusers import StableDiffusionPipeline

    from dgq_utils.world.evaluator import AttributeEvaluator
    from dgq_utils.world.models import (
        AttributeClassifier,
        make_clip,
        make_scheduler,
        make_unet,
        make_vae,
        text_encoder_from_clip,
    )
    from dgq_utils.world.text import build_world_tokenizer

    torch.manual_seed(0)
    tok = build_world_tokenizer(root / "pipeline" / "tokenizer")
    clip = make_clip(tok)
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    pipe = StableDiffusionPipeline(vae=make_vae(), text_encoder=text_encoder_from_clip(clip), tokenizer=tok,
                                   unet=make_unet(), scheduler=make_scheduler("pndm"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipeline")
    AttributeEvaluator(AttributeClassifier()).save(root / "evaluator")
    return root


def test_embedded_comparison_wiring(tmp_path):
    """run_embedded_comparison through the world's real interfaces (random weights stand in for data/embedded)."""
    from dgq_utils.evaluate.compare import embedded_prompts, run_embedded_comparison

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = _build_random_embedded(tmp_path / "embedded")
        res = run_embedded_comparison(
            tmp_path / "out", recipes=["baseline-w8a6"], n_prompts=4, n_calibration=2, n_reference=16,
            embedded_dir=root, settings=SamplerSettings(num_inference_steps=2, batch_size=4), n_boot=100,
            n_boot_set=10, progress=False, cache_root=tmp_path / "cache", feature_dir=tmp_path / "feats")
    prompts, held = embedded_prompts(4)
    assert held == [False, False, False, True] and list(res.generations["fp"].manifest["prompt"]) == prompts
    t = res.table.set_index(["recipe", "metric"])
    for m in ("fid", "kid", "clip_score", "alignment_caption", "alignment_colour", "alignment_caption_heldout"):
        assert ("fp", m) in t.index and ("baseline-w8a6", m) in t.index, m
    assert "dgq-world-evaluator" in t.loc[("fp", "fid"), "note"]
    assert {"psnr", "ssim"} <= {m for r, m in t.index if r == "baseline-w8a6"}
    assert t.loc[("fp", "clip_score"), "value"] == pytest.approx(
        res.per_image["fp"]["clip_score"].mean())
    assert res.generations["fp"].manifest["height"].iloc[0] == 64


@pytest.mark.slow
def test_default_embedded_comparison_on_the_real_model(tmp_path):
    """The report's call on the shipped embedded model, at a small N (skipped until data/embedded exists)."""
    from dgq_utils.model.loading import EMBEDDED_PIPELINE_DIR
    from dgq_utils.evaluate.compare import DEFAULT_RECIPES, run_embedded_comparison

    if not (EMBEDDED_PIPELINE_DIR / "model_index.json").exists():
        pytest.skip("data/embedded is not there yet")
    res = run_embedded_comparison(tmp_path, n_prompts=8, n_calibration=8, n_reference=64, n_boot=200, n_boot_set=20,
                                  progress=False, cache_root=tmp_path / "cache", feature_dir=tmp_path / "feats")
    assert list(dict.fromkeys(res.table["recipe"])) == ["fp", *DEFAULT_RECIPES]
    fp = res.table[res.table.recipe == "fp"].set_index("metric")
    assert fp.loc["alignment_caption", "value"] > 0.2  # the trained model follows its captions
