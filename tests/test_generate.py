"""Generation runner: determinism, batch independence, cache, resume after a kill, corrupt entries, atomic writes."""
import json
import os

import pytest

from dgq_utils.atomic import atomic_save_image, atomic_write_text, clean_stale_temp_files
from dgq_utils.generate.images import (
    MANIFEST_COLUMNS,
    count_missing,
    generate_images,
    image_seed,
    load_manifest,
    model_identity,
)
from dgq_utils.config import SamplerSettings

PROMPTS = ["a red car parked in the city", "a blue house near a river", "a horse in the snow",
           "an old clock near a white cup"]
S = SamplerSettings(num_inference_steps=2, batch_size=4, height=32, width=32)
N = len(PROMPTS) * 2


@pytest.fixture(scope="module")
def pipe():
    from dgq_utils.testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


def _gen(pipe, root, prompts=PROMPTS, seeds=(0, 1), **kw):
    kw.setdefault("settings", S)
    return generate_images(pipe, prompts, seeds, root, progress=False, **kw)


def test_same_seed_same_bytes_and_manifest(pipe, tmp_path):
    a = _gen(pipe, tmp_path / "a")
    b = _gen(pipe, tmp_path / "b")
    assert a.generated == N and list(a.manifest.columns) == MANIFEST_COLUMNS
    assert list(a.manifest["sha256"]) == list(b.manifest["sha256"])
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a.paths, b.paths))
    # different seeds and different prompts give different images
    assert a.manifest["sha256"].nunique() == len(a.manifest)
    row = a.manifest.iloc[0]
    assert (row.steps, row.guidance, row.height, row.width, row.sampler) == (2, 7.5, 32, 32, "DDIMScheduler")
    assert row.recipe_name == "fp" and row.image_seed == image_seed(0, 0)


def test_image_does_not_depend_on_its_batch(pipe, tmp_path):
    full = _gen(pipe, tmp_path / "full", seeds=(0,))
    shas = dict(zip(full.manifest["prompt_index"], full.manifest["sha256"]))
    # the same images generated one at a time (other batch-mates: padding) and in reversed order
    one = _gen(pipe, tmp_path / "one", prompts=[PROMPTS[2]], seeds=(0,), prompt_indices=[2])
    assert one.manifest["sha256"].iloc[0] == shas[2]
    rev = _gen(pipe, tmp_path / "rev", prompts=PROMPTS[::-1], seeds=(0,), prompt_indices=list(range(4))[::-1])
    assert dict(zip(rev.manifest["prompt_index"], rev.manifest["sha256"])) == shas


def test_cache_reuse_and_keys(pipe, tmp_path):
    first = _gen(pipe, tmp_path)
    again = _gen(pipe, tmp_path)
    assert again.generated == 0 and again.reused == N and again.folder == first.folder
    more_steps = _gen(pipe, tmp_path, prompts=PROMPTS[:1], seeds=(0,),
                      settings=SamplerSettings(num_inference_steps=3, batch_size=4))
    assert more_steps.folder != first.folder and more_steps.generated == 1
    other_recipe = count_missing(pipe, PROMPTS, (0, 1), tmp_path, recipe="dgq-w8a8", settings=S)
    assert other_recipe == N
    with pytest.raises(RuntimeError, match="not in the cache"):
        _gen(pipe, tmp_path, recipe="dgq-w8a8", require_cached=True)
    # a different prompt list shares the folder without clashing
    shifted = _gen(pipe, tmp_path, prompts=["a dog", *PROMPTS[1:]], seeds=(0,))
    assert shifted.generated == 1 and shifted.reused == 3
    assert model_identity(pipe).startswith("fingerprint:") and model_identity(pipe, "x") == "x"


class Killed(Exception):
    pass


def test_resume_after_kill_equals_clean_run(pipe, tmp_path):
    clean = _gen(pipe, tmp_path / "clean")
    seen = []

    def kill_after_6(rec):
        seen.append(rec["file"])
        if len(seen) == 6:  # mid-batch: images 5-6 are written, their batch's manifest part is not
            raise Killed

    with pytest.raises(Killed):
        _gen(pipe, tmp_path / "run", on_image=kill_after_6)
    resumed = _gen(pipe, tmp_path / "run")
    assert resumed.reused == 4 and resumed.generated == 4  # the record-less images 5-6 are regenerated
    assert resumed.manifest.drop(columns=[]).equals(clean.manifest)
    assert [p.read_bytes() for p in resumed.paths] == [p.read_bytes() for p in clean.paths]
    man = (resumed.folder / "manifest.jsonl").read_text().splitlines()
    assert len(man) == N and not list((resumed.folder / "manifest.parts").iterdir())


def test_corrupt_entries_are_regenerated(pipe, tmp_path):
    clean = _gen(pipe, tmp_path)
    paths = clean.paths
    paths[0].write_bytes(paths[0].read_bytes()[:50])  # truncated PNG
    paths[1].unlink()  # missing file
    lines = (clean.folder / "manifest.jsonl").read_text().splitlines()
    lines[2] = lines[2][:40]  # damaged manifest line
    (clean.folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (clean.folder / "images" / ".p000000-x.png.tmp-abc").write_bytes(b"partial")  # left by a kill mid-write
    fixed = _gen(pipe, tmp_path)
    assert fixed.generated == 3 and fixed.repaired == 3 and fixed.reused == N - 3
    assert fixed.manifest.equals(clean.manifest)
    assert not [p for p in (clean.folder / "images").iterdir() if ".tmp-" in p.name]
    assert load_manifest(clean.folder).shape[0] == N


def test_jpg_option_and_verify_modes(pipe, tmp_path):
    r = _gen(pipe, tmp_path, prompts=PROMPTS[:2], seeds=(0,),
             settings=SamplerSettings(num_inference_steps=2, batch_size=4, image_format="jpg"))
    assert all(p.suffix == ".jpg" and p.read_bytes()[:2] == b"\xff\xd8" for p in r.paths)
    for verify in ("size", "decode"):
        assert generate_images(pipe, PROMPTS[:2], [0], tmp_path, progress=False, verify=verify,
                               settings=SamplerSettings(num_inference_steps=2, batch_size=4,
                                                        image_format="jpg")).generated == 0
    with pytest.raises(ValueError, match="verify mode"):
        _gen(pipe, tmp_path, verify="md5")


def test_bad_input(pipe, tmp_path):
    with pytest.raises(ValueError, match="prompt list is empty"):
        _gen(pipe, tmp_path, prompts=[])
    with pytest.raises(TypeError, match="not a single string"):
        _gen(pipe, tmp_path, prompts="a dog")
    with pytest.raises(ValueError, match="seed list is empty"):
        _gen(pipe, tmp_path, seeds=[])
    with pytest.raises(ValueError, match="duplicate seeds"):
        _gen(pipe, tmp_path, seeds=[1, 1])
    with pytest.raises(ValueError, match="image_format"):
        SamplerSettings(image_format="webp")
    with pytest.raises(ValueError, match="multiple of 8"):
        SamplerSettings(height=30)
    with pytest.raises(ValueError, match="unknown preset"):
        _gen(pipe, tmp_path, recipe="dgq-w3a3")


def test_atomic_helpers(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (4, 4), (10, 20, 30))
    data = atomic_save_image(img, tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes() == data
    atomic_write_text(tmp_path / "t.json", json.dumps({"a": 1}))

    class Boom(Exception):
        pass

    import dgq_utils.atomic as atomic

    with pytest.raises(Boom):
        with atomic.atomic_open(tmp_path / "t.json", "w") as fh:
            fh.write('{"a": ')
            raise Boom
    assert json.loads((tmp_path / "t.json").read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["t.json", "x.png"]
    (tmp_path / ".t.json.tmp-zzz").write_text("junk")
    assert clean_stale_temp_files(tmp_path) == 1
    with pytest.raises(ValueError, match="mode"):
        with atomic.atomic_open(tmp_path / "t.json", "a"):
            pass
