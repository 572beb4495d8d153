"""``python -m dgq_utils.protocol``: argument and input checks (each error names its option and where the paper's
file comes from), the paper's settings mapped to presets, the Table 2 layout, a run on a tiny SDXL-Turbo-like
pipeline, and (slow) the same images and table from 2 processes as from 1, and a resume after a killed rank.

The protocol's inputs are tiny fake files made here: a captions CSV, a reference-statistics npz, a PartiPrompts
TSV, empty stand-ins for the Inception / CLIP weight files (only their existence is checked before a run), and
tiny pipelines saved with ``save_pretrained`` where a model folder is needed."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from dgq_utils.config.presets import PRESETS
from dgq_utils.config.validation import InvalidArgumentError
from dgq_utils.evaluate import metrics as M
from dgq_utils.evaluate.protocol import ProtocolConfig
from dgq_utils.evaluate.config import BootstrapConfig
from dgq_utils.generate.images import load_manifest
from dgq_utils.model.loading import model_family
from dgq_utils.protocol import cli
from dgq_utils.protocol.paper import PAPER_TABLE2_FILE, paper_table2, parse_setting, plan_entries, recipe_for
from dgq_utils.protocol.run import ProtocolRun, run_protocol
from dgq_utils.protocol.table import table2_long, table2_wide, write_table2
from dgq_utils.report.comparison import PAPER_TABLE2
from dgq_utils.testing.families import build_tiny_sdxl_pipeline
from dgq_utils.testing.protocol_run import tiny_clip_scorer
from dgq_utils.testing.tiny import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a picture of a dog", "a red car parked in the city", "a blue house near a river", "a horse in the snow",
            "a painting of a forest and a river", "a small bird flying over the beach",
            "a yellow flower in a green forest", "an old clock near a white cup", "a black horse at night",
            "a green bus in the sky"]
PARTI = ["a dog in the snow", "a red bus near a house", "a white bird over the river"]


# ---- the inputs, as tiny fake files -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("protocol_cli_inputs")
    pd.DataFrame({"file_name": [f"COCO_val2014_{i:012d}.jpg" for i in range(10)], "caption": CAPTIONS}).to_csv(
        d / "metadata.csv", index=False)
    real = (torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    M.save_reference_statistics(d / "real_im256.npz",
                                M.fid_statistics(M.extract_features(real, M.PIXELS_DEBUG)["pixels"]))
    pd.DataFrame({"Prompt": PARTI, "Category": ["Animals"] * 3}).to_csv(d / "PartiPrompts.tsv", sep="\t", index=False)
    (d / M.INCEPTION_WEIGHTS_FILE).write_bytes(b"stand-in")  # existence is all --check looks at
    (d / "open_clip_pytorch_model.bin").write_bytes(b"stand-in")
    build_tiny_pipeline().save_pretrained(d / "sd14")
    return d


def _argv(d: Path, *extra, protocol="sd-v1.4", model="sd14", out=None):
    argv = [protocol, "--coco-captions", str(d / "metadata.csv"), "--fid-reference", str(d / "real_im256.npz"),
            "--inception-weights", str(d / M.INCEPTION_WEIGHTS_FILE),
            "--clip-weights", str(d / "open_clip_pytorch_model.bin"),
            "--out", str(out or d / "out"), "--device", "cpu", "--n-images", "6", "--n-calibration", "3"]
    if model is not None:
        argv += ["--model", str(d / model)]
    return argv + [str(x) for x in extra]


def _replace(argv, option, value):
    i = argv.index(option)
    return argv[:i + 1] + [str(value)] + argv[i + 2:]


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    return capsys.readouterr().err


def test_check_passes_with_every_input_and_prints_the_plan(inputs, capsys):
    assert cli.main(_argv(inputs, "--check", "--settings", "W8A8", "w4a6", "--k", "8", "16",
                          "--methods", "dgq", "tfmq", "--partiprompts", inputs / "PartiPrompts.tsv",
                          "--n-parti-prompts", "2")) == 0
    out = capsys.readouterr().out
    for recipe in ("fp", "baseline-w8a8", "dgq-w8a8-g8", "dgq-w8a8", "baseline-w4a6", "dgq-w4a6-g8", "dgq-w4a6"):
        assert f"-> {recipe}\n" in out + "\n"
    assert "25 steps, guidance 7.5, 512x512" in out and "7 recipes x 12 images = 84 images" in out
    assert "inputs: all present" in out
    assert not (inputs / "out" / "images").exists()  # --check runs nothing


@pytest.mark.parametrize("option, value, words", [
    ("--coco-captions", "none.csv", ["--coco-captions", "none.csv", "BK-SDM", "metadata.csv"]),
    ("--fid-reference", "missing.npz", ["--fid-reference", "missing.npz", "real_im256.npz"]),
    ("--inception-weights", "inc.pth", ["--inception-weights", "inc.pth", "torch-fidelity",
                                        M.INCEPTION_WEIGHTS_FILE]),
    ("--clip-weights", "clip.bin", ["--clip-weights", "clip.bin", "laion/CLIP-ViT-g-14-laion2B-s34B-b88K"]),
    ("--model", "no-such-model", ["--model", "no such folder", "CompVis/stable-diffusion-v1-4"]),
])
def test_a_missing_input_names_its_option_and_the_papers_source(inputs, tmp_path, capsys, option, value, words):
    err = _error(capsys, _replace(_argv(inputs), option, tmp_path / value))
    for w in words:
        assert w in err, (w, err)
    assert err.count("\n") == 1  # one line, no traceback


def test_optional_inputs_and_the_model_are_named_too(inputs, tmp_path, capsys):
    err = _error(capsys, _argv(inputs, "--partiprompts", tmp_path / "PartiPrompts.tsv"))
    assert "--partiprompts" in err and "google-research/parti" in err
    err = _error(capsys, _argv(inputs, "--calibration-captions", tmp_path / "captions_train2017.json"))
    assert "--calibration-captions" in err and "cocodataset.org" in err
    err = _error(capsys, _argv(inputs, model=None))
    assert "--model: no model folder given" in err and "CompVis/stable-diffusion-v1-4" in err
    err = _error(capsys, _argv(inputs, protocol="sdxl-turbo", model=None))
    assert "stabilityai/sdxl-turbo" in err
    args = _argv(inputs)
    i = args.index("--clip-weights")
    err = _error(capsys, args[:i] + args[i + 2:])
    assert "--clip-weights: not given" in err and "laion" in err
    (tmp_path / "not_a_model").mkdir()
    err = _error(capsys, _replace(_argv(inputs), "--model", tmp_path / "not_a_model"))
    assert "not a diffusers pipeline folder" in err


def test_a_model_of_another_family_is_refused(inputs, capsys):
    err = _error(capsys, _argv(inputs, protocol="sdxl-turbo"))  # the SD 1.x folder for the SDXL-Turbo protocol
    assert "--model" in err and "'sd1'" in err and "sdxl-turbo" in err


def test_too_few_captions_or_parti_prompts(inputs, capsys):
    assert "fewer than n_images=11" in _error(capsys, _replace(_argv(inputs), "--n-images", 11))
    assert "need 3" in _error(capsys, _replace(_argv(inputs), "--n-images", 9))  # no captions left to calibrate
    err = _error(capsys, _argv(inputs, "--partiprompts", inputs / "PartiPrompts.tsv", "--n-parti-prompts", 5))
    assert "--partiprompts" in err and "fewer than --n-parti-prompts=5" in err


@pytest.mark.parametrize("extra, words", [
    (["--k", "12"], ["--k", "12", "4, 8, 16"]),
    (["--methods", "brecq"], ["--methods", "'brecq'", "'tfmq'"]),
    (["--settings", "W3A3"], ["--settings", "W8A8, W8A6, W4A8, W4A6"]),
    (["--settings", "fp"], ["--settings"]),
    (["--n-clip", "0"], ["--n-clip", ">= 1"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--dtype", "int8"], ["--dtype", "floating-point"]),
    (["--seed", "-1"], ["--seed"]),
])
def test_bad_values_name_the_option(inputs, capsys, extra, words):
    err = _error(capsys, _argv(inputs, *extra))
    for w in words:
        assert w in err, (w, err)


def test_argparse_level_errors(inputs, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sd-v2"] + _argv(inputs)[1:])
    assert e.value.code == 2 and "invalid choice: 'sd-v2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(_argv(inputs, "--n-images", "many"))
    if not torch.cuda.is_available():
        assert "--device" in _error(capsys, _replace(_argv(inputs), "--device", "cuda"))


# ---- the paper's settings and numbers -----------------------------------------------------------------------
def test_settings_methods_and_k_map_to_presets():
    assert [parse_setting(s) for s in ("w8a8", "W8A6", "4/8", " w4a6 ")] == ["W8A8", "W8A6", "W4A8", "W4A6"]
    with pytest.raises(InvalidArgumentError, match="--settings"):
        parse_setting("W32A32")
    assert recipe_for("dgq", "W8A8", 16) == "dgq-w8a8" and recipe_for("dgq", "W4A6", 8) == "dgq-w4a6-g8"
    assert recipe_for("tfmq", "W8A6") == "baseline-w8a6" and recipe_for("qdiff", "W4A8") == "baseline-w4a8-shared"
    entries = plan_entries(["W8A8", "W8A6", "W4A8", "W4A6"], [16, 8], ["dgq", "tfmq", "qdiff"])
    assert entries[0].recipe == "fp" and len(entries) == 1 + 4 * 4
    assert all(e.recipe in PRESETS for e in entries)
    assert [e.label for e in entries[1:5]] == ["Q-Diff", "TFMQ", "DGQ K=8", "DGQ K=16"]  # the paper's row order


def test_the_paper_numbers_have_one_copy():
    t = paper_table2()
    assert len(t) == 17 + 9 and set(t["model"]) == {"sd-v1.4", "sdxl-turbo"}
    turbo = paper_table2("sdxl-turbo").set_index(["bits", "method"])
    assert turbo.loc[("W32A32", "FP"), "fid"] == 21.25
    assert turbo.loc[("W8A8", "DGQ"), "fid"] == 22.46 and turbo.loc[("W8A6", "DGQ"), "fid"] == 34.31
    assert turbo.loc[("W8A6", "TFMQ"), "fid"] == 163.02 and set(turbo["k"].dropna()) == {8}
    sd = paper_table2("sd-v1.4")
    assert sd.loc[(sd.bits == "W4A6") & (sd.k == 16), "fid"].item() == 43.66
    # the report reads the same file
    pd.testing.assert_frame_equal(PAPER_TABLE2, sd[PAPER_TABLE2.columns].astype({"k": "float64"}))
    assert "PAPER_TABLE2 = pd.DataFrame(" not in (ROOT / "dgq_utils/report/comparison.py").read_text()
    assert PAPER_TABLE2_FILE.parent.name == "protocol"
    assert '"dgq_utils.protocol" = ["*.csv"]' in (ROOT / "pyproject.toml").read_text()  # shipped in the wheel


def _results(rows):
    return pd.DataFrame([dict(recipe=r, metric=m, value=v, ci_low=v - 1e-3, ci_high=v + 1e-3, n=6)
                         for r, m, v in rows])


def test_table2_layout_rows_settings_columns_method_by_metric(tmp_path):
    entries = plan_entries(["W8A8", "W8A6"], [8, 16], ["dgq", "tfmq"])
    coco = _results([("fp", "isc", 30.0), ("fp", "fid", 15.0), ("fp", "clip_score", 0.3),
                     ("dgq-w8a8", "fid", 14.0), ("baseline-w8a6", "fid", 170.0)])
    parti = _results([("fp", "clip_score", 0.29)])
    long = table2_long("sd-v1.4", entries, coco, parti)
    assert len(long) == len(entries) * 4
    r = long.set_index(["recipe", "metric"])
    assert r.loc[("dgq-w8a8", "fid"), "paper"] == 13.15 and r.loc[("dgq-w8a8", "fid"), "ours"] == 14.0
    assert r.loc[("fp", "parti_clip"), "ours"] == 0.29 and r.loc[("fp", "parti_clip"), "paper"] == 0.293
    assert math.isnan(r.loc[("dgq-w8a6-g8", "fid"), "ours"]) and r.loc[("dgq-w8a6-g8", "fid"), "paper"] == 37.76
    wide = table2_wide(long)
    assert list(wide["setting"]) == ["W32A32", "W8A8", "W8A6"]
    assert list(wide.columns[:5]) == ["setting", "FP IS", "FP FID", "FP CLIP", "FP Parti CLIP"]
    assert "DGQ K=16 FID" in wide.columns and "TFMQ FID" in wide.columns and "DGQ K=8 CLIP" in wide.columns
    w = wide.set_index("setting")
    assert w.loc["W8A8", "DGQ K=16 FID"] == "14.00 [14.00, 14.00] · paper 13.15"
    assert w.loc["W8A6", "DGQ K=8 FID"] == "– · paper 37.76"
    assert w.loc["W32A32", "FP CLIP"] == "0.300 [0.299, 0.301] · paper 0.298"
    assert w.loc["W32A32", "DGQ K=16 FID"] == ""  # FP has its own columns
    # no Parti results: no Parti columns
    assert not any("Parti" in c for c in table2_wide(table2_long("sd-v1.4", entries, coco)).columns)
    md = write_table2(tmp_path, long, title="T", notes=["a note"]).read_text()
    assert md.startswith("# T\n") and "| setting | FP IS |" in md and "* a note" in md
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "table2.csv", dtype={"k": "Int64", "n": "Int64"}), long)


def test_sdxl_turbo_table_has_the_papers_turbo_numbers():
    entries = plan_entries(["W8A6"], [8], ["dgq", "tfmq"])
    long = table2_long("sdxl-turbo", entries, _results([("dgq-w8a6-g8", "fid", 40.0)]))
    r = long.set_index(["recipe", "metric"])["paper"]
    assert r[("fp", "fid")] == 21.25 and r[("dgq-w8a6-g8", "fid")] == 34.31 and r[("baseline-w8a6", "fid")] == 163.02


# ---- a run, in process, on a tiny SDXL-Turbo-like pipeline ---------------------------------------------------
def test_a_turbo_pipeline_built_in_code_is_recognised():
    # its scheduler config has no _class_name (a loaded one has): the family comes from the scheduler's class
    assert model_family(build_tiny_sdxl_pipeline(turbo=True)) == "sdxl-turbo"
    assert model_family(build_tiny_sdxl_pipeline()) == "sdxl"


def test_sdxl_turbo_protocol_runs_on_a_tiny_pipeline(inputs, tmp_path):
    entries = plan_entries(["W8A8"], [8], ["tfmq"])
    run = ProtocolRun("sdxl-turbo", tmp_path / "out", inputs / "metadata.csv", inputs / "real_im256.npz",
                      partiprompts=inputs / "PartiPrompts.tsv", entries=tuple(entries),
                      config=ProtocolConfig(n_images=4, n_clip=3, resize=16, n_calibration=2),
                      n_parti_prompts=2, parti_images_per_prompt=2, bootstrap=BootstrapConfig(n_boot=50, n_set=5),
                      device="cpu")
    assert run.the_sampler.guidance_scale == 0.0 and run.the_sampler.num_inference_steps == 4
    run = dataclasses.replace(run, sampler=run.the_sampler.replace(num_inference_steps=2, height=32, width=32,
                                                                    batch_size=2))
    res = run_protocol(run, pipe_factory=lambda: build_tiny_sdxl_pipeline(turbo=True),
                       feature_extractor=M.PIXELS_DEBUG, clip_scorer=tiny_clip_scorer(), progress=False)
    assert res.generated == 2 * (4 + 2 * 2)
    t = res.table2.set_index(["recipe", "metric"])
    for recipe in ("fp", "baseline-w8a8"):
        for metric in ("fid", "clip_score", "parti_clip"):
            assert math.isfinite(t.loc[(recipe, metric), "ours"]), (recipe, metric)
    assert t.loc[("fp", "fid"), "paper"] == 21.25 and t.loc[("baseline-w8a8", "fid"), "paper"] == 111.69
    assert t.loc[("fp", "parti_clip"), "n"] == 4  # 2 prompts x 2 images, all scored
    meta = json.loads((tmp_path / "out" / "run.json").read_text())
    assert meta["family"] == "sdxl-turbo" and meta["sampler"]["guidance_scale"] == 0.0 and meta["world_size"] == 1
    assert "SDXL-Turbo" in (tmp_path / "out" / "table2.md").read_text()
    with pytest.raises(InvalidArgumentError, match="sdxl-turbo"):  # the SD 1.x pipeline is refused
        run_protocol(run, pipe_factory=build_tiny_pipeline, feature_extractor=M.PIXELS_DEBUG,
                     clip_scorer=tiny_clip_scorer(), progress=False)


# ---- 1 process vs 2 (gloo), and a killed rank --------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(inputs: Path, out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["sd-v1.4", "--coco-captions", str(inputs / "metadata.csv"), "--fid-reference",
            str(inputs / "real_im256.npz"), "--partiprompts", str(inputs / "PartiPrompts.tsv"),
            "--n-parti-prompts", "2", "--parti-images-per-prompt", "2", "--settings", "W8A8", "--k", "16",
            "--n-images", "5", "--n-clip", "3", "--n-calibration", "3", "--resize", "16", "--n-boot", "50",
            "--n-boot-set", "5", "--out", str(out), *extra]
    mod = ["-m", "dgq_utils.testing.protocol_run", *args]
    if nproc == 1:
        cmd = [sys.executable, *mod]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *mod]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)


def _images(out: Path, complete: bool = True) -> dict:
    """{recipe/file: sha256} over every recipe's manifest (consolidated + parts), as the ranks log them; for a
    ``complete`` run, also that no image file lacks its record."""
    found = {}
    for folder in sorted(p for p in (out / "images").iterdir() if p.is_dir()):
        man = load_manifest(folder)
        found.update({f"{r}/{f}": s for r, f, s in zip(man["recipe_name"], man["file"], man["sha256"])})
    if complete:
        assert len(found) == len(list((out / "images").rglob("*.png")))  # no stray or duplicated files
    return found


def _tables(out: Path):
    return (pd.read_csv(out / "table2.csv"), pd.read_csv(out / "results.csv"),
            pd.read_csv(out / "parti" / "results.csv"))


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol_one")
    r = _launch(inputs, out, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_processes_give_the_same_images_and_table_as_one(inputs, one_process, tmp_path):
    r = _launch(inputs, tmp_path, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _images(tmp_path) == _images(one_process) and len(_images(tmp_path)) == 2 * (5 + 2 * 2)
    for a, b in zip(_tables(tmp_path), _tables(one_process)):
        pd.testing.assert_frame_equal(a, b)
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [x["world_size"] for x in ranks] == [2, 2]
    done = ranks[0]["generated"] + ranks[1]["generated"]
    assert len(done) == len(set(done)) == len(_images(one_process))  # split, nothing made twice
    assert ranks[1]["generated"]  # rank 1 did its share
    assert len(list((tmp_path / "quant_states").glob("*.safetensors"))) == 1  # calibrated once, shared


@pytest.mark.slow
def test_a_killed_rank_resumes_with_nothing_lost_or_duplicated(inputs, one_process, tmp_path):
    killed = _launch(inputs, tmp_path, 2, "--die-after", "3")
    assert killed.returncode != 0
    assert not (tmp_path / "table2.csv").exists()  # no metrics on partial images
    # images with a manifest record survive the kill; a file written just before it but not yet recorded is
    # made again (the runner cannot know it is complete)
    before = set(_images(tmp_path, complete=False))
    assert 0 < len(before) < len(_images(one_process))
    r = _launch(inputs, tmp_path, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _images(tmp_path) == _images(one_process)
    for a, b in zip(_tables(tmp_path), _tables(one_process)):
        pd.testing.assert_frame_equal(a, b)
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    again = {f for x in ranks for f in x["generated"]}
    assert not again & before  # recorded images were reused, not made again
    assert len(again) + len(before) == len(_images(one_process))
