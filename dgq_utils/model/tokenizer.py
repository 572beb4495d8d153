"""Build a small word-level ``CLIPTokenizer`` offline.

Stable Diffusion's tokenizer is a byte-pair-encoding ``CLIPTokenizer`` with ~49k tokens. The embedded model
(and the tiny test pipelines) need the *same class* so that every code path is the one a real checkpoint
takes, but with a vocabulary of a few hundred tokens so the text encoder stays small.

We write ``vocab.json`` and ``merges.txt`` in the format CLIP uses: every known word becomes one token
``word</w>``, reached from its characters by merges chosen so that CLIP's rank-ordered BPE reaches it; the single characters (a-z, 0-9 and a
few punctuation marks, each with and without the end-of-word marker) stay in the vocabulary so that an
unknown word still tokenizes (into characters) instead of silently vanishing. ``<|startoftext|>`` (BOS,
always at position 0) and ``<|endoftext|>`` (EOS, also used for padding, as in SD v1.x) close the vocabulary.

The tokenizer is then loaded with ``CLIPTokenizer.from_pretrained(folder)``, the path every real checkpoint
takes. (Passing ``vocab_file=``/``merges_file=`` to the constructor is avoided on purpose: recent
transformers versions silently build an empty vocabulary from the old argument names.)
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Iterable

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_BASE_CHARS = string.ascii_lowercase + string.digits + ".,'-!?"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one lowercase word: repeatedly merge the best-ranked adjacent pair."""
    pieces = list(word)
    pieces[-1] = pieces[-1] + "</w>"
    while len(pieces) > 1:
        pairs = {(a, b) for a, b in zip(pieces, pieces[1:])}
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def _add_word_merges(word: str, merges: list[tuple[str, str]], ranks: dict[tuple[str, str], int]) -> None:
    """Append the merges ``word`` needs to become one token under the merges already present.

    A word is encoded with the existing merges first; where it gets stuck (another word's merge split it
    differently, e.g. ``tr`` from "tree" inside "street"), the leftmost remaining pair is appended as a new
    merge of the lowest priority. Appending at the end never changes how earlier words encode: at every step
    of their encoding a better-ranked merge applied.
    """
    while True:
        pieces = _bpe(word, ranks)
        if len(pieces) == 1:
            return
        pair = (pieces[0], pieces[1])
        ranks[pair] = len(merges)
        merges.append(pair)


def write_word_level_vocab(words: Iterable[str], folder: str | Path, model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer config for ``words`` into ``folder``."""
    words = sorted({w.strip().lower() for w in words if w and w.strip()})
    if not words:
        raise ValueError("write_word_level_vocab needs at least one word; got an empty list.")
    bad = [w for w in words if any(c not in _BASE_CHARS for c in w)]
    if bad:
        raise ValueError(
            f"Words may only use the characters {_BASE_CHARS!r}; these do not: {bad[:5]}. "
            "Split them into plain lowercase words first."
        )
    if model_max_length < 3:
        raise ValueError(f"model_max_length must be at least 3 (BOS, one token, EOS); got {model_max_length}.")
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for c in _BASE_CHARS:
        add(c)
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        _add_word_merges(word, merges, ranks)
    for a, b in merges:
        add(a + b)
    add(BOS)
    add(EOS)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2)
    )
    return folder


def build_word_level_tokenizer(words: Iterable[str], folder: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write a word-level vocabulary for ``words`` into ``folder`` and load it as a ``CLIPTokenizer``.

    Raises if the loaded tokenizer does not map every word to exactly one token (the guard against a
    transformers version that would build an empty or different vocabulary).
    """
    words = list(words)
    write_word_level_vocab(words, folder, model_max_length)
    tok = CLIPTokenizer.from_pretrained(str(folder))
    check_word_level_tokenizer(tok, words)
    return tok


def check_word_level_tokenizer(tok: CLIPTokenizer, words: Iterable[str]) -> None:
    """Raise ``RuntimeError`` unless each word is one token and BOS/EOS frame every encoding."""
    for word in {w.strip().lower() for w in words if w and w.strip()}:
        ids = tok(word)["input_ids"]
        if len(ids) != 3 or ids[0] != tok.bos_token_id or ids[-1] != tok.eos_token_id:
            raise RuntimeError(
                f"Tokenizer check failed: {word!r} encodes to {tok.convert_ids_to_tokens(ids)}, expected "
                f"[BOS, '{word}</w>', EOS]. The installed transformers version may load vocab files differently."
            )


def out_of_vocabulary_words(tok: CLIPTokenizer, prompt: str) -> list[str]:
    """Words of ``prompt`` that the tokenizer does not know as whole words (they fall apart into characters)."""
    unknown = []
    for word in prompt.lower().replace(",", " ").replace(".", " ").split():
        if len(tok(word)["input_ids"]) != 3:
            unknown.append(word)
    return unknown


# ----------------------------------------------------------------------------------------------------------
# prompts outside a word-level vocabulary
# ----------------------------------------------------------------------------------------------------------
#: a tokenizer with fewer tokens than this is taken as word-level (the embedded and tiny models: a few hundred);
#: SD's BPE CLIPTokenizer has 49,408 and can spell any text, so it is never checked
WORD_LEVEL_MAX_VOCAB = 5000


class UnknownWordsWarning(UserWarning):
    """Prompts contain words a word-level tokenizer does not know. Make it an error with
    ``warnings.simplefilter("error", UnknownWordsWarning)`` (or ``-W error::...UnknownWordsWarning``)."""


def is_word_level(tok) -> bool:
    """Whether ``tok`` is a small word-level vocabulary (unknown words fall apart into characters / EOS)."""
    return int(getattr(tok, "vocab_size", WORD_LEVEL_MAX_VOCAB)) < WORD_LEVEL_MAX_VOCAB


def unknown_words(tok, prompts) -> list[str]:
    """The distinct words of ``prompts`` (first-appearance order) that ``tok`` does not know as whole words;
    always ``[]`` for a real (BPE) tokenizer."""
    if tok is None or not is_word_level(tok):
        return []
    words = dict.fromkeys(w for p in prompts for w in p.lower().replace(",", " ").replace(".", " ").split())
    return [w for w in words if len(tok(w)["input_ids"]) != 3]


def warn_unknown_words(pipe, prompts, name: str = "prompts", limit: int = 12) -> list[str]:
    """One :class:`UnknownWordsWarning` listing the words of ``prompts`` outside ``pipe``'s word-level vocabulary
    (nothing for real SD tokenizers). Returns the unknown words."""
    import warnings

    tok = getattr(pipe, "tokenizer", None)
    unknown = unknown_words(tok, prompts)
    if unknown:
        shown = ", ".join(repr(w) for w in unknown[:limit]) + (f", ... ({len(unknown)} in all)"
                                                                if len(unknown) > limit else "")
        warnings.warn(
            f"{name}: {len(unknown)} word(s) are not in the model's word-level vocabulary ({tok.vocab_size} tokens) "
            f"and become character or end-of-text tokens the model was never trained on: {shown}. Use the "
            "vocabulary's words (data/embedded/README.md lists them), or make this an error with "
            "warnings.simplefilter('error', dgq_utils.model.tokenizer.UnknownWordsWarning).",
            UnknownWordsWarning, stacklevel=3)
    return unknown
