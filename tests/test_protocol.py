"""The paper protocol, end to end on tiny stand-ins: a tiny pipeline, a 10-row captions file, a fake reference
statistics file, a weight-free feature extractor and a tiny open_clip model loaded from a local file."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from dgq_utils.evaluate import metrics as M
from dgq_utils.evaluate.protocol import QUIRKS, calibration_captions, read_captions, run_paper_protocol
from dgq_utils.testing.tiny import build_tiny_open_clip

CAPTIONS = ["a picture of a dog", "a red car parked in the city", "a blue house near a river", "a horse in the snow",
            "a painting of a forest and a river", "a small bird flying over the beach",
            "a yellow flower in a green forest", "an old clock near a white cup", "a black horse at night",
            "a green bus in the rain"]


def factory():
    from dgq_utils.testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("protocol_inputs")
    pd.DataFrame({"file_name": [f"COCO_val2014_{i:012d}.jpg" for i in range(10)], "caption": CAPTIONS}).to_csv(
        d / "metadata.csv", index=False)
    real = (torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    M.save_reference_statistics(d / "real_im256.npz", M.fid_statistics(M.extract_features(real, M.PIXELS_DEBUG)["pixels"]))
    build_tiny_open_clip(d, "dgq-protocol-tiny-clip")  # weights: d / "dgq-protocol-tiny-clip.pt"
    return d


def _run(files, out, **kw):
    args = dict(recipes=["dgq-w8a8"], n_images=6, n_clip=4, resize=16, num_inference_steps=2, height=32, width=32,
                batch_size=3, n_calibration=3, device="cpu", pipe_factory=factory, feature_extractor=M.PIXELS_DEBUG,
                n_boot=100, n_boot_set=10, progress=False)
    args.update(kw)
    return run_paper_protocol(None, files / "metadata.csv", files / "real_im256.npz", None, "dgq-protocol-tiny-clip",
                              files / "dgq-protocol-tiny-clip.pt", out, **args)


def test_protocol_end_to_end(files, tmp_path):
    res = _run(files, tmp_path / "out")
    t = res.table.set_index(["recipe", "metric"])
    for r in ("fp", "dgq-w8a8"):
        for m in ("fid", "isc", "clip_score"):
            assert np.isfinite(t.loc[(r, m), "value"])
    assert t.loc[("fp", "clip_score"), "n"] == 4 and t.loc[("fp", "fid"), "n"] == 6  # CLIP on the first n_clip
    assert "first 4 images" in t.loc[("fp", "clip_score"), "note"]
    assert {"psnr", "ssim"} <= set(res.table.loc[res.table.recipe == "dgq-w8a8", "metric"])
    assert ("dgq-w8a8", "fid") in set(zip(res.paired.recipe, res.paired.metric))
    man = res.generations["fp"].manifest
    assert list(man["prompt"]) == CAPTIONS[:6] and set(man["seed"]) == {42}
    assert all(p.suffix == ".png" for p in res.generations["fp"].paths)
    proto = json.loads((tmp_path / "out" / "protocol.json").read_text())
    assert proto["n_images"] == 6 and proto["quirks"] == QUIRKS and proto["reference_dim"] == 192
    # rerun: everything from the caches, same table
    again = _run(files, tmp_path / "out")
    assert all(g.generated == 0 for g in again.generations.values())
    pd.testing.assert_frame_equal(again.table, res.table)


def test_jpeg_quirk_option(files, tmp_path):
    res = _run(files, tmp_path / "jpg", recipes=[], image_format="jpg", n_images=3, n_clip=3)
    assert all(p.suffix == ".jpg" for p in res.generations["fp"].paths)
    assert set(res.table.metric) == {"fid", "isc", "clip_score"}


def test_captions_readers_and_calibration(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 1, "caption": " A dog "}, {"image_id": 1, "caption": "another"},
                            {"image_id": 2, "caption": "A  cat"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    df = read_captions(tmp_path / "c.json")
    assert list(df.caption) == ["A dog", "A cat"] and list(df.file_name) == ["a.jpg", "b.jpg"]
    pd.DataFrame({"text": ["x", "y", "z"]}).to_csv(tmp_path / "t.csv", index=False)
    assert list(read_captions(tmp_path / "t.csv").caption) == ["x", "y", "z"]
    cal = calibration_captions(["x"], pool=["x", "y", "z", "w"], n=2)
    assert len(cal) == 2 and "x" not in cal and cal == calibration_captions(["x"], pool=["x", "y", "z", "w"], n=2)
    with pytest.raises(ValueError, match="need 3"):
        calibration_captions(["x", "y"], pool=["x", "y", "z", "w"], n=3)
    pd.DataFrame({"other": [1]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="no 'caption' column"):
        read_captions(tmp_path / "bad.csv")


def test_missing_inputs_are_named(files, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        run_paper_protocol(
            None, tmp_path / "none.csv", files / "real_im256.npz", None, "dgq-protocol-tiny-clip",
            files / "dgq-protocol-tiny-clip.pt", tmp_path, pipe_factory=factory, feature_extractor=M.PIXELS_DEBUG, device="cpu")
    with pytest.raises(FileNotFoundError, match="real_im256.npz"):
        run_paper_protocol(None, files / "metadata.csv", tmp_path / "missing.npz", None, "dgq-protocol-tiny-clip",
                           files / "dgq-protocol-tiny-clip.pt", tmp_path, pipe_factory=factory,
                           feature_extractor=M.PIXELS_DEBUG, device="cpu")
    with pytest.raises(FileNotFoundError, match="ViT-g-14"):
        run_paper_protocol(None, files / "metadata.csv", files / "real_im256.npz", None, "ViT-g-14",
                           tmp_path / "open_clip_pytorch_model.bin", tmp_path, pipe_factory=factory,
                           feature_extractor=M.PIXELS_DEBUG, device="cpu")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        run_paper_protocol(None, files / "metadata.csv", files / "real_im256.npz", None, "dgq-protocol-tiny-clip",
                           files / "dgq-protocol-tiny-clip.pt", tmp_path, pipe_factory=factory, device="cpu")
    with pytest.raises(ValueError, match="fewer than n_images"):
        _run(files, tmp_path / "o", n_images=11)
