"""Prompts with words outside a word-level vocabulary (embedded / tiny models) warn once per call, listing the
words; a warnings filter makes it an error; real (BPE) tokenizers are never checked."""
from __future__ import annotations

import warnings

import pytest

from dgq_utils.calibrate.observe import collect_activation_stats
from dgq_utils.config import SamplerSettings
from dgq_utils.generate.images import generate_images
from dgq_utils.model.tokenizer import (
    UnknownWordsWarning,
    unknown_words,
    warn_unknown_words,
)
from dgq_utils.quantize.pipeline import quantize_pipeline
from dgq_utils.testing.tiny import TINY_PROMPTS

ODD = ["a zebra wearing a crown", "a café in münchen", TINY_PROMPTS[0]]


def test_unknown_words_are_listed_once_in_order(tiny_pipe):
    assert unknown_words(tiny_pipe.tokenizer, ODD + ODD) == ["zebra", "wearing", "crown", "café", "münchen"]
    assert unknown_words(tiny_pipe.tokenizer, list(TINY_PROMPTS)) == []


def test_generate_warns_once_per_call(pipe, tmp_path):
    with pytest.warns(UnknownWordsWarning) as record:
        generate_images(pipe, ODD, [0], tmp_path, settings=SamplerSettings(num_inference_steps=1, batch_size=3),
                        progress=False)
    msgs = [str(w.message) for w in record if issubclass(w.category, UnknownWordsWarning)]
    assert len(msgs) == 1 and msgs[0].startswith("prompts: ") and "'zebra'" in msgs[0] and "'münchen'" in msgs[0]


def test_warning_can_be_an_error_and_nothing_is_made(pipe, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWordsWarning)
        with pytest.raises(UnknownWordsWarning, match="zebra"):
            generate_images(pipe, ODD, [0], tmp_path, settings=SamplerSettings(num_inference_steps=1),
                            progress=False)
        with pytest.raises(UnknownWordsWarning, match="^calibration prompts: .*zebra"):
            quantize_pipeline(pipe, "dgq-w8a8", ODD, sampler=SamplerSettings(num_inference_steps=2), progress=False)
        with pytest.raises(UnknownWordsWarning, match="^prompts: .*zebra"):
            collect_activation_stats(pipe, ODD, sampler=SamplerSettings(num_inference_steps=1), progress=False)
    assert not (tmp_path / "images").exists() and not any(tmp_path.rglob("*.png"))


def test_known_words_are_silent(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWordsWarning)
        assert warn_unknown_words(pipe, list(TINY_PROMPTS)) == []


def test_real_sized_tokenizers_are_not_checked():
    class BigTokenizer:  # what SD's 49,408-token BPE tokenizer looks like to the check
        vocab_size = 49408

        def __call__(self, text):
            raise AssertionError("a BPE tokenizer must not be probed")

    class Pipe:
        tokenizer = BigTokenizer()

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWordsWarning)
        assert warn_unknown_words(Pipe(), ODD) == []
