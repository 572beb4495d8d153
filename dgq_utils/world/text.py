"""Tokenizer of the world and vectorised caption -> token-id conversion (for training on the GPU).

The tokenizer is the lead's offline word-level ``CLIPTokenizer`` (:mod:`dgq_utils.tokenizer`) built on
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

from dgq_utils.tokenizer import BOS, EOS, check_word_level_tokenizer

from . import scenes as W

MAX_LENGTH = 77


_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?"


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's greedy byte-pair merge loop (lowest rank first, all occurrences at once)."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        r = min(pairs)[0]
        a, b = [k for k, v in ranks.items() if v == r][0]
        out, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and pieces[i] == a and pieces[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(pieces[i])
                i += 1
        pieces = out
    return pieces


def write_world_vocab(words, folder: str | Path, model_max_length: int = MAX_LENGTH) -> Path:
    """Write ``vocab.json``/``merges.txt``/tokenizer config for a word-level ``CLIPTokenizer``.

    Same file format as :func:`dgq_utils.tokenizer.write_word_level_vocab`, but the merges are built by
    *simulating* the greedy BPE loop word by word: each new word is first merged with the merges already
    written, and only the remaining pieces get new (higher-ranked) merges. Merges written for earlier words
    therefore never break a later word and vice versa. (Plain left-to-right merges per word, ranked in
    word order, do break words whose inner character pairs are another word's first merge: 'cyan',
    'orange', 'triangle' fall apart in this vocabulary.)
    """
    import json

    words = sorted({w.strip().lower() for w in words if w and w.strip()})
    bad = [w for w in words if any(c not in _CHARS for c in w)]
    if bad:
        raise ValueError(f"Words may only use the characters {_CHARS!r}; these do not: {bad[:5]}.")
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for c in _CHARS:
        add(c)
        add(c + "</w>")
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in ranks:
                ranks[pair] = len(ranks)
            add(pieces[0] + pieces[1])
            pieces = _bpe(pieces, ranks)
        if pieces != [word + "</w>"]:
            raise RuntimeError(f"Could not build a single-token merge chain for {word!r}: {pieces}")
    add(BOS)
    add(EOS)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = sorted(ranks, key=ranks.get)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "bos_token": BOS,
              "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2))
    return folder


def build_world_tokenizer(folder: str | Path, model_max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """Write and load the world's tokenizer in ``folder``; checks that each word is one token."""
    write_world_vocab(W.vocabulary(), folder, model_max_length)
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
