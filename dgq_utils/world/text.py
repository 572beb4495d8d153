"""Tokenizer of the world and vectorised caption -> token-id conversion (for training on the GPU).

The tokenizer is the lead's offline word-level ``CLIPTokenizer`` (:mod:`dgq_utils.model.tokenizer`) built on
:func:`dgq_utils.world.scenes.vocabulary`: every word is one token, BOS (``<|startoftext|>``) at position
0, EOS after the last word, then EOS as padding up to 77 positions -- SD v1.x's layout.

:class:`CaptionIds` turns a batch of :class:`~dgq_utils.world.scenes.Scenes` into the same ids as
``tokenizer(captions, padding="max_length")`` without going through strings (a table per template and
layout with placeholders for the attribute words), so the training loops can build a batch on the GPU.
Tests check the two agree.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTokenizer

from dgq_utils.model.tokenizer import check_word_level_tokenizer, write_word_level_vocab
from dgq_utils.world import scenes as W

MAX_LENGTH = 77


def build_world_tokenizer(folder: str | Path, model_max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """Write and load the world's tokenizer in ``folder``; checks that each word is one token."""
    write_word_level_vocab(W.vocabulary(), folder, model_max_length)
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    check_word_level_tokenizer(tok, W.vocabulary())
    return tok


def load_world_tokenizer(folder: str | Path) -> CLIPTokenizer:
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    check_word_level_tokenizer(tok, W.vocabulary())
    return tok


def tokenize(tok: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """SD-style ids: (B, model_max_length), padded with EOS, truncated."""
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


class CaptionIds:
    """Vectorised scenes -> token ids that equal ``tokenize(tok, captions(scenes))``."""

    _SLOTS = ("size0", "colour0", "shape0", "size1", "colour1", "shape1")

    def __init__(self, tok: CLIPTokenizer, length: int | None = None):
        self.length = length or tok.model_max_length
        self.bos, self.eos = tok.bos_token_id, tok.eos_token_id

        def wid(word: str) -> int:
            ids = tok(word)["input_ids"]
            if len(ids) != 3:
                raise RuntimeError(f"{word!r} is not a single token of this tokenizer.")
            return ids[1]

        self.words = {
            "size": torch.tensor([wid(w) for w in W.SIZES]),
            "colour": torch.tensor([wid(w) for w in W.COLOUR_NAMES]),
            "shape": torch.tensor([wid(w) for w in W.SHAPES]),
        }
        n_t = max(len(W.ONE_OBJECT_TEMPLATES), len(W.TWO_OBJECT_TEMPLATES))
        n_l = max(len(W.POSITIONS), len(W.RELATIONS))
        table = torch.full((2, n_t, n_l, self.length), self.eos, dtype=torch.long)
        marks = {f"@{k}": -(i + 1) for i, k in enumerate(self._SLOTS)}
        a, b = "@size0 @colour0 @shape0", "@size1 @colour1 @shape1"
        for ti, t in enumerate(W.ONE_OBJECT_TEMPLATES):
            for li, p in enumerate(W.POSITIONS):
                self._fill(table[0, ti, li], t.format(a=a, pos=W.POSITION_PHRASES[p]), marks, wid)
        for ti, t in enumerate(W.TWO_OBJECT_TEMPLATES):
            for li, r in enumerate(W.RELATIONS):
                self._fill(table[1, ti, li], t.format(a=a, b=b, rel=W.RELATION_PHRASES[r]), marks, wid)
        self.table = table
        self.empty = tokenize(tok, [""])[0]

    def _fill(self, row, text, marks, wid):
        words = text.split()
        if len(words) + 2 > self.length:
            raise ValueError(f"Caption template too long for {self.length} positions: {text!r}")
        row[0] = self.bos
        for i, w in enumerate(words):
            row[1 + i] = marks[w] if w in marks else wid(w)
        row[1 + len(words)] = self.eos

    def __call__(self, s: "W.Scenes", device=None) -> torch.Tensor:
        dev = torch.device(device) if device is not None else s.n_objects.device
        table = self.table.to(dev)
        ids = table[(s.n_objects - 1).to(dev), s.template.to(dev), s.layout.to(dev)].clone()
        for i, name in enumerate(self._SLOTS):
            kind, slot = name[:-1], int(name[-1])
            values = getattr(s, kind)[:, slot].to(dev).clamp(min=0)
            words = self.words[kind].to(dev)[values]
            ids = torch.where(ids == -(i + 1), words[:, None], ids)
        return ids

    def empty_ids(self, n: int, device=None) -> torch.Tensor:
        return self.empty.to(device).expand(n, -1).clone()
