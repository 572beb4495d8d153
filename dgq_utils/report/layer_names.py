"""UNet layer names for tables and figures: block of a layer, UNet order, short labels.
"""
from __future__ import annotations

import re
from typing import Iterable

__all__ = [
    "block_of",
    "unet_rank",
    "quantized_inputs",
    "short_name",
]


# ==============================================================================================================
# names
# ==============================================================================================================
def block_of(name: str) -> str:
    """The UNet block a module belongs to: ``down_blocks.1``, ``mid_block``, ``up_blocks.0``, ``time_embedding``,
    ``conv_in`` ..."""
    m = re.match(r"^((?:down|up)_blocks\.\d+|mid_block)", name)
    return m.group(1) if m else name.split(".")[0]


def unet_rank(name: str) -> tuple:
    """Sort key putting UNet module names in forward order: conv_in, time embedding, down blocks, mid block,
    up blocks, conv_out (then by name)."""
    b = block_of(name)
    m = re.match(r"^(down|up)_blocks\.(\d+)", b)
    if b == "conv_in":
        r = (0, 0)
    elif b == "time_embedding":
        r = (1, 0)
    elif m and m.group(1) == "down":
        r = (2, int(m.group(2)))
    elif b == "mid_block":
        r = (3, 0)
    elif m:
        r = (4, int(m.group(2)))
    elif b.startswith("conv_norm") or b == "conv_out":
        r = (5, 0)
    else:
        r = (6, 0)
    return r + (name,)


def quantized_inputs(names: Iterable[str], recipe: str = "dgq-w8a6") -> list[str]:
    """``names`` without the modules a recipe keeps in FP (``skip_layers``: ``conv_in``, ``conv_out``; an
    attention's ``.q/.k/.v`` follow their attention module)."""
    import fnmatch

    from dgq_utils.config import get_preset

    pats = get_preset(recipe).skip_layers
    out = []
    for n in names:
        base = n.rsplit(".", 1)[0] if n.endswith((".q", ".k", ".v")) else n
        if not any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(base, p) for p in pats):
            out.append(n)
    return out


def short_name(name: str) -> str:
    """A compact label for plots: ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` ->
    ``down1.attn0.attn2.to_k``."""
    s = re.sub(r"transformer_blocks\.(\d+)\.", lambda m: "" if m.group(1) == "0" else f"tb{m.group(1)}.", name)
    s = re.sub(r"down_blocks\.(\d+)", r"down\1", s)
    s = re.sub(r"up_blocks\.(\d+)", r"up\1", s)
    s = s.replace("mid_block", "mid").replace("attentions.", "attn").replace("resnets.", "res")
    s = s.replace("downsamplers.0", "down").replace("upsamplers.0", "up").replace("time_embedding", "temb")
    return s
