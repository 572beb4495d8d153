"""Quantized attention at SD v1.5 shapes on a GPU: fused kernel vs reference processor vs plain fp16 SDPA.

    python benchmarks/bench_attention.py                      # batch 16 (8 prompts x CFG), fp16, CUDA
    python benchmarks/bench_attention.py --batch 2 --dtype bf16 --out /tmp/attention

For each attention shape of the SD v1.5 UNet at 512 px (64x64 latents; self-attention over 4096 / 1024 / 256 / 64
tokens with head dim 40 / 80 / 160 / 160, cross-attention over the 77 text tokens; 8 heads) it times, with CUDA
events (``triton.testing.do_bench``, median):

* ``core``: the attention alone on head-split Q/K/V -- ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``,
  unquantized), ``fused`` (:func:`dgq_utils.kernels.quant_attention`, DGQ's softmax quantizer: log2, 8 bits,
  per-prompt scale, ``<start>`` FP in cross-attention);
* ``processor``: one call of a diffusers ``Attention`` module (projections included) with diffusers'
  ``AttnProcessor2_0`` (plain fp16 SDPA), :class:`~dgq_utils.model.attention.DGQAttnProcessor` on its fused path and on
  its reference (materialising) path, the same probability quantizer, Q/K/V quantizers off (they are the same
  elementwise work on both paths and are measured elsewhere);

and the peak memory each call allocates on top of its inputs (the reference's shared probability workspace is
freed first, so its allocation is counted). ``per UNet step`` weighs each shape by how often it occurs in the SD
v1.5 UNet (16 transformer blocks, one self- and one cross-attention each: 5 at 64x64, 5 at 32x32, 5 at 16x16, 1 in
the mid block). Writes ``benchmarks/results/attention_h200.json`` and ``.md`` (``--out`` changes the stem).
Needs CUDA, Triton and diffusers.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, latent side, channels, count in the UNet per attention kind)
SD15_LEVELS = [("64x64", 64, 320, 5), ("32x32", 32, 640, 5), ("16x16", 16, 1280, 5), ("mid 8x8", 8, 1280, 1)]
HEADS = 8
# --sweep candidates by (float32?, padded head dim): (BLOCK_M, BLOCK_N, num_warps, num_stages)
SWEEP = {False: {64: [(128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 3), (64, 32, 4, 4),
                      (128, 64, 8, 4)],
                 128: [(128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2)],
                 256: [(64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2), (32, 32, 4, 3)]}}
TEXT_TOKENS, TEXT_DIM = 77, 768


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="UNet batch (prompts x 2 for CFG); default 16")
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    ap.add_argument("--bits", type=int, default=8, help="softmax bits (default 8, as dgq-w8a8)")
    ap.add_argument("--rep-ms", type=float, default=200.0, help="do_bench repetition time per measurement (ms)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "attention_h200"))
    ap.add_argument("--sweep", action="store_true",
                    help="also time the fused kernel under alternative launch configurations (BLOCK_M, BLOCK_N, "
                         "warps, stages) per shape, to choose kernels.quant_attention.default_config")
    a = ap.parse_args()

    import torch
    import triton
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from tqdm import tqdm

    from dgq_utils.atomic import atomic_write_json, atomic_write_text
    from dgq_utils.kernels import ProbQuantSpec, quant_attention
    from dgq_utils.kernels.quant_attention import default_config
    from dgq_utils.model.attention import DGQAttnProcessor, ProbQuantizer, release_workspace

    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA device (the fused kernel runs on CUDA).")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    dev = torch.device("cuda")
    torch.manual_seed(0)

    def bench(fn, *args, before=lambda: None, **kwargs):
        """(median ms, peak MiB on top of the inputs) of ``fn(*args, **kwargs)``."""
        def call():
            return fn(*args, **kwargs)

        call()  # compile / warm
        torch.cuda.synchronize()
        before()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = triton.testing.do_bench(call, warmup=25, rep=a.rep_ms, return_mode="median")
        return float(ms), peak / 2**20

    def rel_l2(x, y):
        x, y = x.double(), y.double()
        return float((x - y).norm() / y.norm())

    rows = []
    jobs = [(lvl, kind) for lvl in SD15_LEVELS for kind in ("self", "cross")]
    with torch.no_grad():
        for (level, side, dim, count), kind in tqdm(jobs, desc="attention shapes"):
            n, d = side * side, dim // HEADS
            nk = TEXT_TOKENS if kind == "cross" else n
            keep_start = kind == "cross"
            spec = ProbQuantSpec("log2", a.bits, "per_prompt", keep_start)
            # core: Q/K/V in the processor's layout, (B, h, N, d) views of (B, N, h, d)
            q = torch.randn(a.batch, n, HEADS, d, device=dev, dtype=dtype).transpose(1, 2)
            k = torch.randn(a.batch, nk, HEADS, d, device=dev, dtype=dtype).transpose(1, 2)
            v = torch.randn(a.batch, nk, HEADS, d, device=dev, dtype=dtype).transpose(1, 2)
            sdpa_ms, sdpa_mb = bench(torch.nn.functional.scaled_dot_product_attention, q, k, v)
            fused_ms, fused_mb = bench(quant_attention, q, k, v, d**-0.5, spec)
            sweep = {}
            if a.sweep:
                for cfg in SWEEP.get(dtype == torch.float32, {}).get(max(64, 1 << (d - 1).bit_length()), []):
                    try:
                        sweep[str(cfg)] = bench(quant_attention, q, k, v, d**-0.5, spec, launch=cfg)[0]
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: record and go on
                        sweep[str(cfg)] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
                print(f"{level} {kind} default {default_config(d, dtype, nk)}: {fused_ms:.3f} ms; sweep {sweep}")
            del q, k, v
            # processor: a diffusers Attention module at this level
            attn = Attention(query_dim=dim, cross_attention_dim=TEXT_DIM if kind == "cross" else None, heads=HEADS,
                             dim_head=d).to(dev, dtype).eval()
            x = torch.randn(a.batch, n, dim, device=dev, dtype=dtype)
            ctx = torch.randn(a.batch, TEXT_TOKENS, TEXT_DIM, device=dev, dtype=dtype) if kind == "cross" else None
            procs = {}
            for backend in ("auto", "reference"):
                pq = ProbQuantizer("p", a.bits, quantizer="log2", scale="per_prompt", keep_start=keep_start)
                pq.mode = "quant"
                procs[backend] = DGQAttnProcessor(f"{level}.{kind}", kind, None, prob_quant=pq, backend=backend)
            plain = AttnProcessor2_0()
            p_ms, p_mb = bench(plain, attn, x, ctx)
            f_ms, f_mb = bench(procs["auto"], attn, x, ctx)
            assert procs["auto"].last_path == "fused", procs["auto"].last_path

            r_ms, r_mb = bench(procs["reference"], attn, x, ctx, before=release_workspace)
            err = rel_l2(procs["auto"](attn, x, ctx), procs["reference"](attn, x, ctx))
            release_workspace()
            rows.append(dict(level=level, kind=kind, count=count, n_query=n, n_key=nk, head_dim=d,
                             core_sdpa_ms=sdpa_ms, core_fused_ms=fused_ms, core_sdpa_mib=sdpa_mb,
                             core_fused_mib=fused_mb, proc_plain_ms=p_ms, proc_fused_ms=f_ms, proc_reference_ms=r_ms,
                             proc_plain_mib=p_mb, proc_fused_mib=f_mb, proc_reference_mib=r_mb,
                             fused_vs_reference_rel_l2=err, fused_config=list(default_config(d, dtype, nk)),
                             sweep_core_fused_ms=sweep))
            del attn, x, ctx, procs
            torch.cuda.empty_cache()

    totals = {key: sum(r[key] * r["count"] for r in rows)
              for key in ("core_sdpa_ms", "core_fused_ms", "proc_plain_ms", "proc_fused_ms", "proc_reference_ms")}
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), batch=a.batch, dtype=a.dtype, bits=a.bits, heads=HEADS,
               quantizer="log2 per_prompt, <start> FP in cross", rep_ms=a.rep_ms)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), dict(env=env, rows=rows, per_unet_step_ms=totals))

    lines = [f"# Quantized attention at SD v1.5 shapes ({env['gpu']}, batch {a.batch}, {a.dtype})", "",
             f"torch {env['torch']}, Triton {env['triton']}; softmax quantizer: log2 {a.bits} bits, per-prompt "
             "scale, `<start>` FP in cross-attention; Q/K/V quantizers off. Median of CUDA-event timings "
             "(`triton.testing.do_bench`); memory = peak allocated by one call on top of its inputs. "
             "Written by `benchmarks/bench_attention.py`.", "",
             "| shape | kind | N q x k | d | core SDPA ms | core fused ms | fused/SDPA | proc plain ms | "
             "proc fused ms | proc reference ms | reference/fused | MiB plain / fused / reference | rel L2 fused vs ref |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['level']} | {r['kind']} | {r['n_query']}x{r['n_key']} | {r['head_dim']} | {r['core_sdpa_ms']:.3f} | "
            f"{r['core_fused_ms']:.3f} | {r['core_fused_ms'] / r['core_sdpa_ms']:.2f} | {r['proc_plain_ms']:.3f} | "
            f"{r['proc_fused_ms']:.3f} | {r['proc_reference_ms']:.3f} | "
            f"{r['proc_reference_ms'] / r['proc_fused_ms']:.1f} | {r['proc_plain_mib']:.0f} / {r['proc_fused_mib']:.0f} / "
            f"{r['proc_reference_mib']:.0f} | {r['fused_vs_reference_rel_l2']:.1e} |")
    t = totals
    lines += ["", f"Per UNet step (32 attention calls, weighted by occurrence): core SDPA {t['core_sdpa_ms']:.1f} ms, "
              f"core fused {t['core_fused_ms']:.1f} ms ({t['core_fused_ms'] / t['core_sdpa_ms']:.2f}x); processor "
              f"plain {t['proc_plain_ms']:.1f} ms, fused {t['proc_fused_ms']:.1f} ms "
              f"({t['proc_fused_ms'] / t['proc_plain_ms']:.2f}x plain), reference {t['proc_reference_ms']:.1f} ms "
              f"({t['proc_reference_ms'] / t['proc_fused_ms']:.1f}x fused).", ""]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
