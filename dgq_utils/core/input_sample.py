"""A bounded, seeded, uniform sample of the input rows a layer sees over many calls.

Weight reconstruction (:mod:`dgq_utils.core.adaround`) needs the inputs of every quantized layer, but a
calibration run feeds each layer thousands of token vectors / pixels per call over hundreds of calls. An
:class:`InputSample` keeps at most ``n`` of them, chosen uniformly without replacement over *every* row of every
call it was shown: each row gets a random key from a CPU ``torch.Generator`` seeded with ``seed`` and the ``n``
smallest keys seen so far are kept (bottom-k sampling; one pass, memory ``O(n)``). The same calls in the same
order give the same sample, bit for bit.

What a "row" is: for a Linear, one input vector (``x.reshape(-1, in_features)``: one token of one image, or one
time-embedding vector); for a Conv2d, the kernel patch under one output position, flattened in the weight's
``(C, kh, kw)`` order, so that ``conv(x)[b, :, i, j] = W.reshape(O, -1) @ patch + bias``. Only the patches of
the chosen positions are gathered (no full ``unfold``). Rows are stored on the CPU in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["InputSample"]


class InputSample:
    """Bottom-k uniform sample of at most ``n`` input rows (see the module docstring).

    ``conv``: ``None`` for a Linear, else ``dict(kernel_size=, stride=, padding=, dilation=)`` (pairs) of a
    zero-padded ``groups=1`` convolution.
    """

    def __init__(self, n: int, seed: int = 0, conv: dict | None = None):
        if int(n) < 1:
            raise ValueError(f"InputSample needs n >= 1; got {n!r}.")
        self.n = int(n)
        self.seed = int(seed)
        self.conv = dict(conv) if conv is not None else None
        self.generator = torch.Generator().manual_seed(self.seed)
        self.keys = torch.empty(0)
        self.rows: Tensor | None = None
        self.seen = 0

    def close(self) -> None:
        """No more rows will be added: drop the generator (the sample can then be deep-copied and pickled)."""
        self.generator = None

    def __len__(self) -> int:
        return 0 if self.rows is None else int(self.rows.shape[0])

    def add(self, x: Tensor) -> None:
        """Offer every row of one call's input ``x`` (Linear: ``(..., I)``; Conv: ``(B, C, H, W)``)."""
        if self.generator is None:
            raise RuntimeError("InputSample.add after close(): the sample is final.")
        x = x.detach()
        if self.conv is None:
            m = x.numel() // x.shape[-1] if x.numel() else 0
        else:
            b, _, h, w = x.shape
            ho, wo = self._out_size(h, w)
            m = b * ho * wo
        if m == 0:
            return
        keys = torch.rand(m, generator=self.generator)
        self.seen += m
        old = self.keys.numel()
        all_keys = torch.cat([self.keys, keys])
        k = min(self.n, all_keys.numel())
        kept, order = torch.topk(all_keys, k, largest=False, sorted=True)  # ascending keys
        is_old = order < old
        new_rows = self._rows(x, order[~is_old] - old)
        out = torch.empty((k, new_rows.shape[1]), dtype=torch.float32)
        if self.rows is not None and bool(is_old.any()):
            out[is_old] = self.rows.index_select(0, order[is_old])
        out[~is_old] = new_rows
        self.rows, self.keys = out, kept

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.conv[k] for k in ("kernel_size", "stride", "padding",
                                                                            "dilation"))
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def _rows(self, x: Tensor, idx: Tensor) -> Tensor:
        if self.conv is None:
            flat = x.reshape(-1, x.shape[-1])
            return flat.index_select(0, idx.to(flat.device)).to("cpu", torch.float32)
        b, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.conv[k] for k in ("kernel_size", "stride", "padding",
                                                                            "dilation"))
        ho, wo = self._out_size(h, w)
        idx = idx.to(x.device)
        bi, rest = idx // (ho * wo), idx % (ho * wo)
        oy, ox = rest // wo, rest % wo
        xp = F.pad(x, (pw, pw, ph, ph))
        iy = (oy * sh)[:, None, None] + (torch.arange(kh, device=x.device) * dh)[None, :, None]  # (m, kh, 1)
        ix = (ox * sw)[:, None, None] + (torch.arange(kw, device=x.device) * dw)[None, None, :]  # (m, 1, kw)
        patches = xp[bi[:, None, None], :, iy, ix]  # (m, kh, kw, C): advanced indices first
        return patches.permute(0, 3, 1, 2).reshape(idx.numel(), c * kh * kw).to("cpu", torch.float32)
