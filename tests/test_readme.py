"""The README's example runs against the public API (``import dgq_utils as dgq``).

Fast: the example block is executed as written, with ``dgq.load_pipeline`` answering the tiny random pipeline
(the embedded model's calibration takes tens of seconds on a CPU); its last comment's claim (a saved state loaded
onto a fresh pipeline gives identical images) is checked too. Slow: the same block on the embedded model.
"""
import re
from pathlib import Path

import pytest
import torch

import dgq_utils as dgq

README = Path(__file__).resolve().parents[1] / "README.md"


def example_block() -> str:
    """The first ``python`` block of the README's "What is here" section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## What is here"):]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "the README's 'What is here' section has no python example"
    return m.group(1)


def test_example_uses_only_the_public_api():
    block = example_block()
    assert "import dgq_utils as dgq" in block
    used = set(re.findall(r"\bdgq\.([A-Za-z_]+)", block))
    assert used and used <= set(dgq.__all__), used - set(dgq.__all__)


def test_example_runs_on_the_tiny_pipeline(tmp_path, monkeypatch):
    from dgq_utils.testing.tiny import build_tiny_pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dgq, "load_pipeline", lambda *a, **k: build_tiny_pipeline(seed=0))
    ns: dict = {}
    exec(compile(example_block(), str(README), "exec"), ns)  # noqa: S102 - the README's own example
    pipe, image = ns["pipe"], ns["image"]
    assert dgq.is_quantized(pipe) and len(ns["report"].layers) > 0
    assert image.size == (32, 32)
    state = tmp_path / "dgq-w8a6.safetensors"
    assert state.is_file()

    def sample(p):
        return p("a red dog", num_inference_steps=25, output_type="latent",  # the calibrated step count
                 generator=torch.Generator().manual_seed(0)).images

    fresh = build_tiny_pipeline(seed=0)
    dgq.load_quant_state(fresh, state)
    assert torch.equal(sample(pipe), sample(fresh))


@pytest.mark.slow
def test_example_runs_on_the_embedded_model(tmp_path, monkeypatch):
    from dgq_utils import paths

    if not (paths.embedded_dir() / "pipeline" / "model_index.json").is_file():
        pytest.skip("data/embedded is not there")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(example_block(), str(README), "exec"), ns)  # noqa: S102
    assert ns["image"].size == (64, 64) and (tmp_path / "dgq-w8a6.safetensors").is_file()
