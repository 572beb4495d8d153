"""Processes sharing the image and calibrated-state caches (notebooks run side by side by the chain, sharded
ranks): each image and each state is made once, by one process, and the others wait for it and reuse it."""
import multiprocessing as mp

import pytest

from dgq_utils.config import SamplerSettings

PROMPTS = ["a red car parked in the city", "a blue house near a river", "a horse in the snow",
           "an old clock near a white cup", "a dog on the beach", "a green tree in a field"]
S = SamplerSettings(num_inference_steps=2, batch_size=2, height=32, width=32)


def _generate(root, prompts, threads, out):
    import torch

    from dgq_utils.generate.images import generate_images
    from dgq_utils.testing.tiny import build_tiny_pipeline

    torch.set_num_threads(threads)  # the parent's: CPU results may depend on the thread count

    res = generate_images(build_tiny_pipeline(seed=0), prompts, (0,), root, settings=S, progress=False)
    out.put((res.generated, list(res.manifest["sha256"])))


def _calibrate(state_dir, out):
    import torch

    from dgq_utils.quantize.cache import StateCache
    from dgq_utils.testing.tiny import build_tiny_pipeline

    torch.set_num_threads(1)

    cache = StateCache(state_dir)
    path = cache.quantize(build_tiny_pipeline(seed=0), "dgq-w8a8", PROMPTS[:2], S, progress=False)
    out.put((len(cache.calibrated), len(cache.hits), path.read_bytes()))


def _kmeans(store, out):
    import numpy as np

    from dgq_utils.core import kmeans

    rng = np.random.default_rng(0)
    jobs = [(rng.normal(size=(60, 2)).astype(np.float32), 4, 0) for _ in range(40)]
    kmeans.set_store(store)
    fitted = []
    real = kmeans.kmeans_chunk
    kmeans.kmeans_chunk = lambda chunk: fitted.append(len(chunk)) or real(chunk)
    labels = kmeans.kmeans_many(jobs)
    out.put((sum(fitted), np.concatenate(labels).tobytes()))


def _run_two(target, args_a, args_b):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, out)) for a in (args_a, args_b)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return results


def test_two_processes_make_each_image_once_and_agree_with_one_process(tmp_path):
    from dgq_utils.generate.images import generate_images
    from dgq_utils.testing.tiny import build_tiny_pipeline

    # one process wants all six prompts, the other the first four (a prefix, like notebooks 05 and 06)
    import torch

    threads = torch.get_num_threads()
    (gen_a, sha_a), (gen_b, sha_b) = _run_two(_generate, (tmp_path / "shared", PROMPTS, threads),
                                              (tmp_path / "shared", PROMPTS[:4], threads))
    made = gen_a + gen_b
    assert made == len(PROMPTS), f"{made} images made for {len(PROMPTS)} wanted: some were made twice"
    clean = generate_images(build_tiny_pipeline(seed=0), PROMPTS, (0,), tmp_path / "clean", settings=S,
                            progress=False)
    want = list(clean.manifest["sha256"])
    got = {len(sha_a): sha_a, len(sha_b): sha_b}
    assert got[6] == want and got[4] == want[:4]


def test_two_processes_make_the_same_kmeans_fits_once(tmp_path):
    (fit_a, lab_a), (fit_b, lab_b) = _run_two(_kmeans, (tmp_path,), (tmp_path,))
    assert sorted([fit_a, fit_b]) == [0, 40]  # one process fitted, the other waited and read the store
    assert lab_a == lab_b
    assert len(list(tmp_path.glob("*.npz"))) == 1


@pytest.mark.slow
def test_two_processes_calibrate_a_state_once(tmp_path):
    (cal_a, hit_a, bytes_a), (cal_b, hit_b, bytes_b) = _run_two(_calibrate, (tmp_path,), (tmp_path,))
    assert sorted([(cal_a, hit_a), (cal_b, hit_b)]) == [(0, 1), (1, 0)]  # one calibrated, the other loaded
    assert bytes_a == bytes_b
