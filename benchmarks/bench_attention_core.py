"""The fused quantized attention's two passes alone at SD v1.5 shapes (GPU), optionally a launch-config sweep.

    python benchmarks/bench_attention_core.py --out /tmp/core                 # this checkout's kernels
    python benchmarks/bench_attention_core.py --root /path/to/other/checkout  # another tree's kernels (before/after)
    python benchmarks/bench_attention_core.py --sweep 64l=128,128,8,3 64l=128,64,8,3

Per SD v1.5 attention shape (batch 16 = 8 prompts x CFG, 8 heads, fp16; DGQ's softmax quantizer: log2, 8 bits,
per-prompt scale, ``<start>`` FP in cross-attention) it times with CUDA events (``triton.testing.do_bench``,
median): plain fp16 SDPA, pass 1 alone (``row_statistics``) and the whole fused call (``quant_attention``: both
passes and the scale), and weighs them by how often the shape occurs in one UNet step (32 attention calls). Only
the public kernel API is used, so ``--root`` can point at an older checkout to compare kernels in one run.

``--sweep`` entries (the ``DGQ_ATTENTION_LAUNCH`` syntax of :mod:`dgq_utils.kernels.quant_attention`): each
config is timed at the shapes of its padded head dim and key kind, and checked against the default config's
output (relative L2 <= 1e-3, i.e. the same levels up to rare flips). ``--best-env FILE`` writes the
``DGQ_ATTENTION_LAUNCH`` value of the configs that beat the default by more than 3 % (empty if none).
Writes ``--out`` .json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (name, latent side, channels, count in the UNet per attention kind), as bench_attention.py
SD15_LEVELS = [("64x64", 64, 320, 5), ("32x32", 32, 640, 5), ("16x16", 16, 1280, 5), ("mid 8x8", 8, 1280, 1)]
HEADS, TEXT_TOKENS = 8, 77


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT), help="checkout whose dgq_utils is timed (default: this one)")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rep-ms", type=float, default=40.0)
    ap.add_argument("--sweep", nargs="*", default=[], help="launch configs to try, e.g. 64l=128,128,8,3")
    ap.add_argument("--best-env", default=None, help="write the winning DGQ_ATTENTION_LAUNCH value here")
    ap.add_argument("--out", default=None, help="output stem (.json/.md); default: print only")
    a = ap.parse_args(argv)
    sys.path.insert(0, a.root)

    import torch
    import triton

    from dgq_utils.kernels import ProbQuantSpec, quant_attention, row_statistics

    if not torch.cuda.is_available():
        raise SystemExit("bench_attention_core.py needs a CUDA device.")
    dev = torch.device("cuda")
    sweep = []
    for entry in a.sweep:
        key, cfg = entry.split("=")
        sweep.append((int(key[:-1]), key[-1] == "s", tuple(int(v) for v in cfg.split(",")), entry))

    def bench(fn, *args, **kw):
        fn(*args, **kw)
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(lambda: fn(*args, **kw), warmup=10, rep=a.rep_ms, return_mode="median"))

    def rel_l2(x, y):
        return float((x.double() - y.double()).norm() / y.double().norm())

    rows = []
    with torch.no_grad():
        for level, side, dim, count in SD15_LEVELS:
            for kind in ("self", "cross"):
                n, d = side * side, dim // HEADS
                nk = TEXT_TOKENS if kind == "cross" else n
                keep = kind == "cross"
                spec = ProbQuantSpec("log2", 8, "per_prompt", keep)
                g = torch.Generator(device=dev).manual_seed(n + d)
                q = torch.randn(a.batch, n, HEADS, d, generator=g, device=dev, dtype=torch.float16).transpose(1, 2)
                k = torch.randn(a.batch, nk, HEADS, d, generator=g, device=dev, dtype=torch.float16).transpose(1, 2)
                v = torch.randn(a.batch, nk, HEADS, d, generator=g, device=dev, dtype=torch.float16).transpose(1, 2)
                r = dict(level=level, kind=kind, n_query=n, n_key=nk, head_dim=d, count=count,
                         sdpa_ms=bench(torch.nn.functional.scaled_dot_product_attention, q, k, v),
                         pass1_ms=bench(row_statistics, q, k, d**-0.5, keep),
                         fused_ms=bench(quant_attention, q, k, v, d**-0.5, spec), sweep={})
                ref = quant_attention(q, k, v, d**-0.5, spec)
                bd = max(16, 1 << (d - 1).bit_length())
                for sbd, short, cfg, entry in sweep:
                    if sbd != bd or short != (nk <= 128):
                        continue
                    try:
                        ms = bench(quant_attention, q, k, v, d**-0.5, spec, launch=cfg)
                        err = rel_l2(quant_attention(q, k, v, d**-0.5, spec, launch=cfg), ref)
                        r["sweep"][entry] = dict(ms=ms, rel_l2_vs_default=err)
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: record, go on
                        r["sweep"][entry] = dict(error=f"{type(exc).__name__}: {str(exc)[:160]}")
                rows.append(r)
                print(json.dumps(r), flush=True)
                del q, k, v, ref
                torch.cuda.empty_cache()

    tot = {key: sum(r[key] * r["count"] for r in rows) for key in ("sdpa_ms", "pass1_ms", "fused_ms")}
    best = {}
    for r in rows:
        for entry, res in r["sweep"].items():
            if "ms" in res and res["rel_l2_vs_default"] <= 1e-3 and res["ms"] < 0.97 * r["fused_ms"]:
                key = entry.split("=")[0]
                gain = (r["fused_ms"] - res["ms"]) * r["count"]
                if gain > best.get(key, ("", 0.0))[1]:
                    best[key] = (entry, gain)
    # one entry per key: it must win at every shape of that key (else keep the default)
    chosen = []
    for key, (entry, _) in best.items():
        shapes = [r for r in rows if entry in r["sweep"]]
        if all("ms" in r["sweep"][entry] and r["sweep"][entry]["ms"] <= r["fused_ms"] * 1.02 for r in shapes):
            chosen.append(entry)
    env_value = ";".join(chosen)
    if a.best_env:
        Path(a.best_env).write_text(env_value + "\n")
    lines = [f"# Fused attention passes at SD v1.5 shapes ({torch.cuda.get_device_name()}, batch {a.batch}, fp16): "
             f"{a.label}", "", f"torch {torch.__version__}, Triton {triton.__version__}; do_bench medians "
             f"(rep {a.rep_ms:g} ms); `benchmarks/bench_attention_core.py`.", "",
             "| shape | kind | N q x k | d | SDPA ms | pass 1 ms | fused (both passes) ms | fused/SDPA | sweep |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sw = ", ".join(f"{e}: {x['ms']:.3f} ms ({x['rel_l2_vs_default']:.0e})" if "ms" in x else f"{e}: {x['error']}"
                       for e, x in r["sweep"].items())
        lines.append(f"| {r['level']} | {r['kind']} | {r['n_query']}x{r['n_key']} | {r['head_dim']} | "
                     f"{r['sdpa_ms']:.3f} | {r['pass1_ms']:.3f} | {r['fused_ms']:.3f} | "
                     f"{r['fused_ms'] / r['sdpa_ms']:.2f} | {sw} |")
    lines += ["", f"Per UNet step (32 calls weighted by occurrence): SDPA {tot['sdpa_ms']:.2f} ms, pass 1 "
              f"{tot['pass1_ms']:.2f} ms, fused {tot['fused_ms']:.2f} ms ({tot['fused_ms'] / tot['sdpa_ms']:.2f}x)."
              + (f" Sweep winners: `{env_value}`." if sweep else ""), ""]
    text = "\n".join(lines)
    print(text)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(dict(label=a.label, rows=rows, per_unet_step_ms=tot,
                                                            best_env=env_value), indent=1))
        out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
