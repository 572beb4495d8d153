"""Metrics on small data: FID/KID/IS through torch-fidelity, CLIP score (transformers and open_clip stand-ins),
PSNR/SSIM/LPIPS vs FP, alignment tables; and the bad-input errors."""

import numpy as np
import pandas as pd
import pytest
import torch

from dgq_utils.evaluate import metrics as M
from dgq_utils.testing.tiny import build_tiny_clip, build_tiny_open_clip


def _images(n, seed, size=32, shift=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 200 + shift
    noise = torch.rand(n, 3, size, size, generator=g) * 55
    return (base + noise).clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------- extractors / FID
def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid metrics: fid, kid, isc"):
        M.check_metrics(["fid", "sharpness"])
    with pytest.raises(ValueError, match=r"valid: .*inception-v3-compat.*pixels-debug"):
        M.extractor_info("inception-v4")
    assert M.check_metrics(["psnr", "psnr", "fid"]) == ["psnr", "fid"]


def test_missing_inception_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth.*download"):
        M.resolve_weights(M.INCEPTION, None)
    with pytest.raises(FileNotFoundError, match=r"not found: .*nope\.pth"):
        M.resolve_weights(M.INCEPTION, tmp_path / "nope.pth")
    # a file in torch-fidelity's cache location is found without being named
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / M.INCEPTION_WEIGHTS_FILE).write_bytes(b"x")
    assert M.resolve_weights(M.INCEPTION, None).endswith(M.INCEPTION_WEIGHTS_FILE)


def test_set_metrics_match_torch_fidelity_calculate_metrics(tmp_path):
    """Our cached-feature path gives exactly what torch-fidelity's own one-call API gives."""
    import torch_fidelity

    a, b = _images(24, 0), _images(20, 1, shift=30)
    fa = M.extract_features(a, M.PIXELS_DEBUG)
    fb = M.extract_features(b, M.PIXELS_DEBUG)
    ours_fid = M.fid(fa["pixels"], M.fid_statistics(fb["pixels"]))
    ours_kid = M.kid(fa["pixels"], fb["pixels"], subsets=10, subset_size=15)
    ours_isc = M.inception_score(fa["logits"], splits=4)

    class DS(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    ref = torch_fidelity.calculate_metrics(
        input1=DS(a), input2=DS(b), cuda=False, fid=True, kid=True, isc=True, feature_extractor=M.PIXELS_DEBUG,
        kid_subsets=10, kid_subset_size=15, isc_splits=4, cache=False, save_cpu_ram=True, verbose=False)
    assert ours_fid == pytest.approx(ref["frechet_inception_distance"], rel=1e-6)
    assert ours_kid[0] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-5)
    assert ours_isc[0] == pytest.approx(ref["inception_score_mean"], rel=1e-6)
    assert ours_fid > 1.0 and M.fid(fa["pixels"], M.fid_statistics(fa["pixels"])) == pytest.approx(0, abs=1e-4)


def test_feature_cache_and_corrupt_entry(tmp_path):
    x = _images(6, 2)
    f1 = M.extract_features(x, M.PIXELS_DEBUG, cache_dir=tmp_path)
    files = list(tmp_path.glob("features-*.npz"))
    assert len(files) == 1
    f2 = M.extract_features(x, M.PIXELS_DEBUG, cache_dir=tmp_path)
    assert np.array_equal(f1["pixels"], f2["pixels"])
    files[0].write_bytes(b"garbage")  # corrupt entry: recomputed, not a crash
    f3 = M.extract_features(x, M.PIXELS_DEBUG, cache_dir=tmp_path)
    assert np.array_equal(f1["pixels"], f3["pixels"])
    with np.load(files[0]) as z:
        assert np.array_equal(z["pixels"], f1["pixels"])


def test_fid_ci_and_reference_stats_file(tmp_path):
    gen, real = _images(40, 3), _images(40, 4, shift=10)
    fg = M.extract_features(gen, M.PIXELS_DEBUG)["pixels"]
    stats = M.fid_statistics(M.extract_features(real, M.PIXELS_DEBUG)["pixels"])
    path = M.save_reference_statistics(tmp_path / "ref.npz", stats, extractor=M.PIXELS_DEBUG)
    loaded = M.load_reference_statistics(path)
    ci = M.fid_ci(fg, loaded, n_boot=30)
    assert ci.value == pytest.approx(M.fid(fg, stats)) and ci.low <= ci.value <= ci.high and ci.n == 40
    k = M.kid_ci(fg, M.extract_features(real, M.PIXELS_DEBUG)["pixels"], n_boot=20, subsets=3, subset_size=20)
    assert k.low <= k.high
    with pytest.raises(FileNotFoundError, match="real_im256.npz"):
        M.load_reference_statistics(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        M.load_reference_statistics(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="feature dimensions differ"):
        M.fid(fg, {"mu": np.zeros(5), "sigma": np.eye(5)})


def test_images_from_files_resize_and_mismatched_sizes(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (48, 48), (0, 255, 0)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="different sizes"):
        M.load_images([tmp_path / "a.png", tmp_path / "b.png"])
    x = M.load_images([tmp_path / "a.png", tmp_path / "b.png"], size=16)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.uint8 and int(x[1, 1].float().mean()) == 255
    with pytest.raises(FileNotFoundError):
        M.load_images([tmp_path / "c.png"])
    with pytest.raises(ValueError, match="shapes differ"):
        M.psnr_per_image(_images(2, 0, 32), _images(2, 0, 16))


# ---------------------------------------------------------------------------------------------- PSNR / SSIM / LPIPS
def test_psnr_ssim_vs_fp():
    ref = _images(4, 5)
    noisy = (ref.float() + torch.randn(ref.shape, generator=torch.Generator().manual_seed(0)) * 8).clamp(0, 255)
    noisy = noisy.round().to(torch.uint8)
    p = M.psnr_per_image(noisy, ref)
    mse = ((noisy.float() - ref.float()) / 255).pow(2).flatten(1).mean(1).double().numpy()
    assert np.allclose(p, 10 * np.log10(1 / mse), atol=1e-3)
    assert np.all(M.psnr_per_image(ref, ref) == M.PSNR_CAP_DB)
    s = M.ssim_per_image(noisy, ref)
    assert s.shape == (4,) and np.all(s < 1) and np.all(s > 0)
    assert np.allclose(M.ssim_per_image(ref, ref), 1.0, atol=1e-6)


def test_lpips_needs_local_backbone(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(M.LpipsUnavailable, match=r"alexnet-owt-7be5be79\.pth"):
        M.LpipsScorer.create("alex")
    with pytest.raises(ValueError, match="unknown LPIPS network"):
        M.LpipsScorer.create("resnet")
    # a local backbone file (random weights here) makes it run, fully offline
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / "alex.pth")
    scorer = M.LpipsScorer.create("alex", backbone_weights=tmp_path / "alex.pth")
    a, b = _images(3, 6), _images(3, 7)
    assert np.allclose(scorer.per_image(a, a), 0, atol=1e-6)
    assert np.all(scorer.per_image(a, b) > 0)


# ---------------------------------------------------------------------------------------------- CLIP score
def test_clip_score_transformers_conventions():
    model, tok = build_tiny_clip()
    scorer = M.ClipScorer.from_transformers(model, tok, batch_size=3)
    x = _images(5, 8, size=40)  # resized + centre-cropped to the vision tower's 32 px
    texts = ["a red car", "a dog", "a blue house", "a horse in the snow", "a cup"]
    s = scorer.scores(x, texts)
    emb_i, emb_t = scorer.encode_images(x), scorer.encode_texts(texts)
    assert torch.allclose(emb_i.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert np.allclose(s, (emb_i * emb_t).sum(-1).numpy(), atol=1e-6) and np.all(np.abs(s) <= 1)
    tm = scorer.scores(x, texts, convention="torchmetrics")
    assert np.allclose(tm, 100 * np.clip(s, 0, None))
    ci, per = M.clip_score(scorer, x, texts, n_boot=50)
    assert ci.value == pytest.approx(per.mean()) and ci.n == 5
    with pytest.raises(ValueError, match="5 images but 2 texts"):
        scorer.scores(x, texts[:2])
    with pytest.raises(ValueError, match="valid: cosine, torchmetrics"):
        scorer.scores(x, texts, convention="x100")


def test_clip_score_open_clip_from_local_weights(tmp_path):
    import open_clip

    model, weights = build_tiny_open_clip(tmp_path, "dgq-test-tiny-clip")
    scorer = M.ClipScorer.from_open_clip("dgq-test-tiny-clip", weights)
    x = _images(3, 9)
    s = scorer.scores(x, ["a red car", "a dog", "a house"])
    with torch.no_grad():  # same as encoding by hand with the loaded weights
        _, _, pre = open_clip.create_model_and_transforms("dgq-test-tiny-clip")
        im = model.encode_image(torch.stack([pre(M._to_pil(i)) for i in x]))
        tx = model.encode_text(open_clip.get_tokenizer("dgq-test-tiny-clip")(["a red car", "a dog", "a house"]))
        manual = torch.nn.functional.cosine_similarity(im, tx).numpy()
    assert np.allclose(s, manual, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="ViT-g-14.*laion2b_s34b_b88k"):
        M.ClipScorer.from_open_clip("ViT-g-14", tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        M.ClipScorer.from_open_clip("ViT-z-99", weights)


# ---------------------------------------------------------------------------------------------- alignment
def test_alignment_table_and_cis():
    def evaluator(images, prompts):
        n = len(prompts)
        colour = np.arange(n) % 2 == 0
        shape = np.ones(n, dtype=bool)
        return pd.DataFrame({"colour": colour, "shape": shape, "caption": colour & shape,
                             "held_out": np.arange(n) < 2})

    tab = M.alignment_table(_images(6, 10), [f"p{i}" for i in range(6)], evaluator)
    cis = M.alignment_cis(tab, n_boot=100)
    assert cis["alignment_shape"].value == 1.0 and cis["alignment_colour"].value == 0.5
    assert cis["alignment_caption_heldout"].n == 2 and cis["alignment_caption_seen"].n == 4
    with pytest.raises(ValueError, match="6 images but 5 prompts"):
        M.alignment_table(_images(6, 10), ["p"] * 5, evaluator)


def test_fast_fid_replicates_equal_torch_fidelity():
    rng = np.random.default_rng(0)
    ref = M.fid_statistics(rng.normal(size=(80, 12)) * 2 + 1)
    for n in (6, 40):  # n <= d and n > d branches
        f = rng.normal(size=(n, 12)) + 0.3
        fast = M.FidReplicates(f, ref)
        for idx in (np.arange(n), rng.integers(0, n, n)):
            assert fast(idx) == pytest.approx(M.fid(f[idx], ref), rel=1e-6, abs=1e-8)


def test_fast_fid_replicates_on_duplicated_indices_and_kid_ci():
    rng = np.random.default_rng(1)
    ref_feats = rng.normal(size=(60, 20))
    ref = M.fid_statistics(ref_feats)
    f = rng.normal(size=(15, 20)) * 1.2
    fast = M.FidReplicates(f, ref)
    idx = np.array([0, 0, 3, 3, 3, 7, 9, 14, 14, 1, 2, 5, 6, 8, 8])
    assert fast(idx) == pytest.approx(M.fid(f[idx], ref), rel=1e-6)
    k = M.kid_ci(f, ref_feats, n_boot=20, subsets=20, subset_size=15)
    assert k.value == pytest.approx(M.kid(f, ref_feats, subsets=20, subset_size=15)[0]) and k.low <= k.high
