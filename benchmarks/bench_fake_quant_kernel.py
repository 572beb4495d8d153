"""Micro-benchmark of the fused activation fake-quant kernel vs the PyTorch reference (CUDA, SD v1.5 shapes).

    python benchmarks/bench_fake_quant_kernel.py      # prints a table: ms per call and effective GB/s
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgq_utils.core.quantizers import fake_quant_uniform, uniform_qparams
from dgq_utils.kernels.fake_quant import ParamStack, fake_quant_uniform_fused

CASES = [  # (what, input shape, channel dim, pixel dims, pixel-wise set?)
    ("linear (16, 4096, 320) channel", (16, 4096, 320), 2, (1,), False),
    ("linear (16, 4096, 320) pixel", (16, 4096, 320), 2, (1,), True),
    ("conv (16, 320, 64, 64) channel", (16, 320, 64, 64), 1, (2, 3), False),
    ("conv (16, 320, 64, 64) pixel", (16, 320, 64, 64), 1, (2, 3), True),
    ("qkv (16, 8, 4096, 40) view", (16, 4096, 8, 40), 3, (2,), False),
]


def main():
    from triton.testing import do_bench

    print("| case | reference (ms) | fused (ms) | speed-up | fused GB/s | bit-identical |")
    print("|---|---|---|---|---|---|")
    for what, shape, ch, px, pixel in CASES:
        x = torch.randn(shape, device="cuda", dtype=torch.float16)
        if what.startswith("qkv"):
            x = x.transpose(1, 2)
        view = [1] * x.ndim
        for d in (px if pixel else (ch,)):
            view[d] = x.shape[d]
        lo = -torch.rand(view, device="cuda") * 3
        hi = torch.rand(view, device="cuda") * 3
        s, z = uniform_qparams(lo, hi, 8)
        st = ParamStack.from_sets({0: (s, z), 1: (s, z)}, ch, px)
        idx = torch.ones((), dtype=torch.int32, device="cuda")
        ref_ms = do_bench(lambda: fake_quant_uniform(x, s, z, 8))
        fu_ms = do_bench(lambda: fake_quant_uniform_fused(x, st, idx, 8))
        same = torch.equal(fake_quant_uniform(x, s, z, 8), fake_quant_uniform_fused(x, st, idx, 8))
        gbs = 2 * x.numel() * x.element_size() / fu_ms / 1e6
        print(f"| {what} | {ref_ms:.3f} | {fu_ms:.3f} | {ref_ms / fu_ms:.1f}x | {gbs:.0f} | {same} |")


if __name__ == "__main__":
    main()
