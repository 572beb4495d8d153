"""The synthetic world: sampling, rendering, captions, splits, tokenizer, evaluator interface (no weights)."""
from __future__ import annotations

import pytest
import torch

from dgq_utils.world import scenes as W
from dgq_utils.world.evaluator import alignment, summarize
from dgq_utils.world.text import CaptionIds, build_world_tokenizer, tokenize


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_world_tokenizer(tmp_path_factory.mktemp("world_tok"))


def test_world_size_requirements():
    assert len(W.SHAPES) >= 5 and len(W.COLOUR_NAMES) >= 8 and len(W.SIZES) == 2
    assert len(W.POSITIONS) >= 4 and set(W.RELATIONS) == {"above", "below", "left", "right"}
    assert len(W.ONE_OBJECT_TEMPLATES) >= 3 and len(W.TWO_OBJECT_TEMPLATES) >= 3


def test_sampling_is_deterministic_and_split_specific():
    a, b = W.sample_scenes(64, "train", seed=3), W.sample_scenes(64, "train", seed=3)
    for k, v in a.__dict__.items():
        if torch.is_tensor(v):
            assert torch.equal(v, getattr(b, k)), k
    assert not torch.equal(a.colour, W.sample_scenes(64, "train", seed=4).colour)
    assert not torch.equal(a.colour, W.sample_scenes(64, "test", seed=3).colour)
    assert torch.equal(W.render(a), W.render(b))


def test_heldout_combinations_absent_from_training_splits():
    held = {(W.COLOUR_NAMES.index(c), W.SHAPES.index(s)) for c, s in W.HELDOUT_COMBOS}
    for split in ("train", "val", "test"):
        s = W.sample_scenes(20000, split, seed=0)
        pairs = {(int(c), int(h)) for c, h in zip(s.colour.flatten(), s.shape.flatten()) if c >= 0}
        assert not pairs & held, split
        assert len(pairs) == 40 - len(held)
    h = W.sample_scenes(2000, "heldout", seed=0)
    assert all((int(h.colour[i, 0]), int(h.shape[i, 0])) in held for i in range(len(h)))
    e = W.sample_scenes(20000, "evaluator", seed=0)
    assert len({(int(c), int(x)) for c, x in zip(e.colour.flatten(), e.shape.flatten()) if c >= 0}) == 40


def test_two_objects_are_distinguishable_and_one_object_slots_empty():
    s = W.sample_scenes(5000, "train", seed=1)
    two = s.n_objects == 2
    assert 0.4 < two.float().mean() < 0.6
    assert ((s.colour[two, 0] != s.colour[two, 1]) | (s.shape[two, 0] != s.shape[two, 1])).all()
    assert (s.colour[~two, 1] == -1).all() and (s.shape[~two, 1] == -1).all()


def test_rendered_pixels_match_attributes():
    s = W.sample_scenes(200, "train", seed=5)
    img = W.render(s)
    assert img.shape == (200, 3, 64, 64) and img.min() >= 0 and img.max() <= 1
    for i in range(len(s)):
        bg = s.background[i]
        for j in range(int(s.n_objects[i])):
            x, y = (int(v) for v in s.center[i, j])
            # the object's colour at its centre
            assert torch.allclose(img[i, :, y, x], s.rgb[i, j], atol=1e-4), (i, j)
            # its mask is centred on the stated centre (bounding box of covered pixels)
            d = (img[i] - bg[:, None, None]).abs().sum(0)
            obj = (img[i] - s.rgb[i, j][:, None, None]).abs().sum(0) < 0.05
            ys, xs = torch.nonzero(obj, as_tuple=True)
            near = ((xs - s.center[i, j, 0]).abs() < 16) & ((ys - s.center[i, j, 1]).abs() < 16)
            xs, ys = xs[near].float() + 0.5, ys[near].float() + 0.5
            assert abs((xs.min() + xs.max()) / 2 - s.center[i, j, 0]) < 1.5
            assert abs((ys.min() + ys.max()) / 2 - s.center[i, j, 1]) < 1.5
            assert d.max() > 0.1
        # a corner far from every object shows the background
        assert torch.allclose(img[i, :, 0, 0], bg, atol=1e-4) or torch.allclose(img[i, :, 63, 63], bg, atol=1e-4)


def test_positions_relations_and_sizes_are_geometrically_true():
    s = W.sample_scenes(3000, "train", seed=6)
    one, two = s.n_objects == 1, s.n_objects == 2
    cx, cy = s.center[:, 0, 0], s.center[:, 0, 1]
    pos = s.layout
    assert (cx[one & (pos == 0)] < 24).all() and (cx[one & (pos == 1)] > 40).all()
    assert (cy[one & (pos == 2)] < 24).all() and (cy[one & (pos == 3)] > 40).all()
    c = one & (pos == 4)
    assert ((cx[c] - 32).abs() <= 4).all() and ((cy[c] - 32).abs() <= 4).all()
    ay, by = s.center[:, 0, 1], s.center[:, 1, 1]
    ax, bx = s.center[:, 0, 0], s.center[:, 1, 0]
    rel = s.layout
    assert (ay[two & (rel == 0)] + 20 < by[two & (rel == 0)]).all()      # A above B
    assert (ay[two & (rel == 1)] > by[two & (rel == 1)] + 20).all()      # A below B
    assert (ax[two & (rel == 2)] + 20 < bx[two & (rel == 2)]).all()      # A left of B
    assert (ax[two & (rel == 3)] > bx[two & (rel == 3)] + 20).all()      # A right of B
    area = (W.render(s) - s.background[:, :, None, None]).abs().sum(1).gt(0.05).flatten(1).sum(1).float()
    small = one & (s.size[:, 0] == 0)
    large = one & (s.size[:, 0] == 1)
    for sh in range(len(W.SHAPES)):
        assert area[small & (s.shape[:, 0] == sh)].max() < area[large & (s.shape[:, 0] == sh)].min()


def test_two_objects_do_not_overlap():
    s = W.sample_scenes(2000, "train", seed=7, p_two=1.0)
    a = W.object_alpha(s)
    assert (a[:, 0] * a[:, 1]).max() == 0                      # no pixel covered by both
    inside = a.flatten(2).amax(-1)
    assert (inside == 1).all()                                 # both objects visible
    edge = torch.cat([a[..., 0, :], a[..., -1, :], a[..., :, 0], a[..., :, -1]], -1).sum(-1)
    assert edge.max() < 8 and (edge > 0).float().mean() < 0.02  # inside the canvas (rare corner slivers)


def test_caption_attribute_round_trip():
    s = W.sample_scenes(500, "train", seed=8)
    for i, cap in enumerate(W.captions(s)):
        assert W.parse_caption(cap) == s.attributes(i), cap
    for t in range(len(W.ONE_OBJECT_TEMPLATES)):
        a = {"n_objects": 1, "objects": [{"size": "large", "colour": "cyan", "shape": "cross"}], "position": "top"}
        assert W.parse_caption(W.caption_from_attributes(a, t)) == a
    for t in range(len(W.TWO_OBJECT_TEMPLATES)):
        for rel in W.RELATIONS:
            a = {"n_objects": 2, "objects": [{"size": "small", "colour": "red", "shape": "circle"},
                                             {"size": "large", "colour": "blue", "shape": "square"}], "relation": rel}
            assert W.parse_caption(W.caption_from_attributes(a, t)) == a
    back = W.scenes_from_captions(W.captions(s))
    for k in ("n_objects", "layout", "colour", "shape", "size"):
        assert torch.equal(getattr(back, k), getattr(s, k)), k
    with pytest.raises(ValueError):
        W.parse_caption("a photo of a cat")


def test_canonical_form_ignores_wording():
    a = W.scenes_from_captions(["a small red circle above a large blue square",
                                "a large blue square below a small red circle",
                                "a small red circle to the left of a large blue square",
                                "a large blue square to the right of a small red circle",
                                "a small red circle below a large blue square"])
    k = W.semantic_keys(a)
    assert k[0] == k[1] and k[2] == k[3] and k[0] != k[2] and k[0] != k[4]
    t = W.canonical_targets(a)
    assert t["colour"][1].tolist() == [W.COLOUR_NAMES.index("red"), W.COLOUR_NAMES.index("blue")]
    assert t["layout"].tolist()[:4] == [5, 5, 6, 6]


def test_tokenizer_is_word_level_sd_style(tok, tmp_path):
    from transformers import CLIPTokenizer

    for word in W.vocabulary():
        ids = tok(word).input_ids
        assert len(ids) == 3 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id, word
    ids = tokenize(tok, ["a small red circle on the left", ""])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == tok.bos_token_id and ids[0, 8] == tok.eos_token_id and (ids[0, 8:] == tok.eos_token_id).all()
    assert ids[1, 0] == tok.bos_token_id and (ids[1, 1:] == tok.eos_token_id).all()
    assert len(tok) < 400
    tok.save_pretrained(tmp_path)          # what save_pretrained of the pipeline writes loads back identically
    again = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert torch.equal(tokenize(again, ["a large white cross to the right of a small cyan diamond"]),
                       tokenize(tok, ["a large white cross to the right of a small cyan diamond"]))


def test_vectorised_caption_ids_equal_the_tokenizer(tok):
    ci = CaptionIds(tok)
    for split in ("train", "heldout"):
        s = W.sample_scenes(600, split, seed=9)
        assert torch.equal(ci(s), tokenize(tok, W.captions(s)))
    assert torch.equal(ci.empty, tokenize(tok, [""])[0])


def test_alignment_scoring_definitions():
    s = W.scenes_from_captions(["a small red circle on the left",
                                "a small red circle above a large blue square",
                                "a small red circle above a large blue square",
                                "a small red circle above a large blue square"])
    t = W.canonical_targets(s)
    pred = {k: v.clone() for k, v in t.items()}
    pred["colour"][0, 1] = pred["shape"][0, 1] = pred["size"][0, 1] = 0
    # image 2: objects swapped (blue square above red circle); image 3: the circle is green
    for k in ("colour", "shape", "size"):
        pred[k][2] = t[k][2].flip(0)
    pred["colour"][3, 0] = W.COLOUR_NAMES.index("green")
    al = alignment(pred, s)
    assert al["whole"].tolist() == [True, True, False, False]
    assert al["relation"].tolist() == [False, True, False, True]
    assert al["objects_present"].tolist() == [True, True, True, False]
    assert al["colour"].tolist() == [1.0, 1.0, 0.0, 0.5]
    res = summarize(al)
    assert res["one_object"]["whole"] == 1.0 and res["two_objects"]["whole"] == pytest.approx(1 / 3, abs=1e-3)


def test_evaluator_interface_on_rendered_images():
    from dgq_utils.world.evaluator import AttributeEvaluator, images_to_tensor
    from dgq_utils.world.models import AttributeClassifier

    torch.manual_seed(0)
    ev = AttributeEvaluator(AttributeClassifier())
    s = W.sample_scenes(6, "test", seed=1)
    img = W.render(s)
    out = ev.outputs(img)
    assert out["penultimate"].shape == (6, 256) and out["layout"].shape == (6, len(W.LAYOUTS))
    u8 = (img * 255).round().to(torch.uint8)
    assert torch.allclose(images_to_tensor(u8), img, atol=1 / 255)
    big = torch.nn.functional.interpolate(img, size=128)
    assert images_to_tensor(big).shape == (6, 3, 64, 64)
    res = ev.score(u8, W.captions(s))
    assert set(res) >= {"whole", "colour", "shape", "count"}


def test_fidelity_extractor_registers():
    pytest.importorskip("torch_fidelity")
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from dgq_utils.world.fidelity import NAME, register

    assert register() == NAME and register() == NAME
    assert NAME in FEATURE_EXTRACTORS_REGISTRY


def test_world_clip_wrapper_interface(tok):
    from dgq_utils.world.clip import WorldCLIP, _Preprocess, _Tokenizer, clip_score
    from dgq_utils.world.models import make_clip

    torch.manual_seed(0)
    model = WorldCLIP(make_clip(tok), tok)
    pre, tk = _Preprocess(), _Tokenizer(tok)
    s = W.sample_scenes(3, "test", seed=2)
    x = torch.stack([pre(im) for im in W.render(s)])
    assert x.shape == (3, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        assert model.encode_image(x).shape == (3, 256) and model.encode_text(tk(W.captions(s))).shape == (3, 256)
    sc = clip_score(W.render(s), W.captions(s), model, pre, tk)
    assert sc.shape == (3,) and (sc >= 0).all() and (sc <= 100).all()
