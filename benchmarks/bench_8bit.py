"""Real 8-bit DGQ at SD v1.5 scale (issue #14, first step): UNet step of fp16 eager / fp16 compiled / fake-quant
``dgq-w8a8`` / int8 / fp8, weight bytes, peak memory, agreement with fake quantization, and GEMM micro-benchmarks.

Model: the SD v1.5 UNet architecture with random weights (``bench_sd_scale.build``: no download), seeded text
states, PNDM. ``dgq-w8a8`` is calibrated once (``--calib-prompts`` prompts x ``--steps`` steps), its state saved;
``int8`` and ``fp8`` are :func:`dgq_utils.quantize.int8.convert_to_8bit` of that state loaded onto a fresh UNet.

Per variant and batch 2 x ``b`` (CFG): the median UNet step (CUDA events, consecutive calls of one trajectory,
so the per-timestep parameter sets change every call), UNet weight bytes (:func:`unet_weight_bytes`), the peak
allocated memory during the step timing, and ``psnr_vs_fakequant`` of the first UNet output of a trajectory and
of the latents after a ``--steps``-step generation at batch 1 (the images' latents; no VAE). GEMM micro-benchmarks
at SD shapes: fp16 ``F.linear``, the fused int8 path (quantize kernel + GEMM kernel, rows and channel-blocked),
the quantize kernel alone, the int8 GEMM alone, cuBLAS ``torch._int_mm`` and fp8 ``torch._scaled_mm`` on
pre-quantized operands. Results: ``benchmarks/results/8bit_sd15_<device>.json`` / ``.md`` (rewritten after every
section; ``--deadline`` seconds keeps a partial run).

    python benchmarks/bench_8bit.py                          # one H200 (~5 min)
    python benchmarks/bench_8bit.py --tiny --device cpu --out /tmp/b8   # smoke test (CPU references)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgq_utils.atomic import atomic_write_text  # noqa: E402
from dgq_utils.kernels import int8_gemm as k8  # noqa: E402
from dgq_utils.quantize.int8 import convert_to_8bit, unet_weight_bytes  # noqa: E402
from dgq_utils.quantize.state import load_quant_state, save_quant_state  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_sd_scale", ROOT / "benchmarks" / "bench_sd_scale.py")
sd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sd)

#: (M, K, N) of SD v1.5 GEMMs at batch 2 x 8 (64x64 latents): tokens x in -> out
GEMM_SHAPES = ((65536, 320, 320), (65536, 320, 2560), (65536, 1280, 320), (16384, 640, 640), (16384, 640, 5120),
               (4096, 1280, 1280), (4096, 1280, 10240), (4096, 5120, 1280))


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    mse = float(((a - ref) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(float(ref.abs().max()) ** 2 / mse)


class Run:
    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.res = {"settings": {k: v for k, v in vars(args).items()}, "machine": sd.machine(), "rows": [],
                    "gemm": [], "conversion": {}, "profile": {}, "errors": [], "skipped": []}

    def left(self) -> float:
        return self.args.deadline - (time.perf_counter() - self.t0)

    def section(self, name, fn, need_s=0.0):
        if self.left() < need_s:
            self.res["skipped"].append(name)
            print(f"[skip] {name}", flush=True)
            return None
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as err:  # noqa: BLE001 - a benchmark reports a failed section and goes on
            import traceback

            self.res["errors"].append({"section": name, "error": f"{type(err).__name__}: {err}"[:1500],
                                       "traceback": traceback.format_exc()[-2500:]})
            print(f"[error] {name}: {type(err).__name__}: {err}", flush=True)
            out = None
        print(f"[done] {name} in {time.perf_counter() - t:.1f} s (elapsed {time.perf_counter() - self.t0:.0f} s)",
              flush=True)
        self.save()
        return out

    def save(self):
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.res["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        finish_rows(self.res)
        atomic_write_text(out.with_suffix(".json"), json.dumps(self.res, indent=1, default=str) + "\n")
        atomic_write_text(out.with_suffix(".md"), markdown(self.res))


def finish_rows(res):
    comp = {r["batch"]: r["step_ms"] for r in res["rows"] if r["variant"] == "fp16-compiled" and r["step_ms"]}
    fp_bytes = next((r["weight_bytes"] for r in res["rows"] if r["variant"] == "fp16-eager"), None)
    for r in res["rows"]:
        c = comp.get(r["batch"])
        r["step_ms_fp16_compiled"] = c
        r["speedup_vs_fp16_compiled"] = round(c / r["step_ms"], 3) if c and r["step_ms"] else None
        r["weight_bytes_fp16"] = fp_bytes
        r["weight_ratio_vs_fp16"] = round(r["weight_bytes"] / fp_bytes, 3) if fp_bytes and r["weight_bytes"] else None


def measure(run, pipe, variant, unet_call=None, ref=None):
    """Step latency, memory and agreement of one variant; appends one row per batch."""
    a = run.args
    dev = pipe.device
    call = unet_call or pipe.unet
    out = {}
    for b in a.batches:
        sd.sync(dev)
        sd.reset_peak(dev)
        t = sd.time_steps(pipe, call, b, a.steps, a.warmup_calls, a.step_calls)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        first = sd.first_output(pipe, call, b, a.steps)
        row = {"variant": variant, "batch": f"2x{b}", "step_ms": t["median_ms"], "step_min_ms": t["min_ms"],
               "weight_bytes": unet_weight_bytes(pipe.unet), "peak_mem_bytes": peak,
               "psnr_vs_fakequant": None if ref is None else round(psnr(first.cpu(), ref[f"step_b{b}"]), 2)}
        out[f"step_b{b}"] = first.cpu()
        run.res["rows"].append(row)
        run.save()
    if a.gen_steps:
        lat = pipe(prompt=sd.prompts(1), num_inference_steps=a.gen_steps, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(0)).images.float().cpu()
        out["generation"] = lat
        if ref is not None:
            for r in run.res["rows"]:
                if r["variant"] == variant:
                    r["psnr_latents_vs_fakequant"] = round(psnr(lat, ref["generation"]), 2)
    return out


def variant_8bit(run, state, backend, ref):
    pipe = sd.build(run.args.tiny, run.args.device, getattr(torch, run.args.dtype))
    load_quant_state(pipe, state)
    t = time.perf_counter()
    rep = convert_to_8bit(pipe, backend)
    run.res["conversion"][backend] = {"seconds": round(time.perf_counter() - t, 2), "converted": len(rep.converted),
                                      "fallback": {k: len(v) for k, v in rep.fallback.items()},
                                      "attention_simulated": rep.attention, "message": rep.message,
                                      "weight_bytes_before": rep.weight_bytes_before,
                                      "weight_bytes_after": rep.weight_bytes_after}
    measure(run, pipe, backend, ref=ref)
    if backend == "int8" and pipe.device.type == "cuda":
        run.res["profile"]["int8"] = sd.profile_step(pipe, max(run.args.batches), run.args.steps, rows=14)
    del pipe


# ---- GEMM micro-benchmarks --------------------------------------------------------------------------------
def _time(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return round(statistics.median(ts), 4)


@torch.no_grad()
def gemm_bench(m, k, n):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    p = 4096 if m % 4096 == 0 else m
    x = torch.randn(m // p, p, k, device=dev, generator=g, dtype=torch.float16)
    w = torch.randn(n, k, device=dev, generator=g, dtype=torch.float16)
    bias = torch.zeros(n, device=dev, dtype=torch.float16)
    ws, wz = (w.float().amax(1) - w.float().amin(1)) / 255, torch.full((n,), 128.0, device=dev)
    wq = k8.quantize_weight_int8(w, ws, wz)
    ps = torch.full((p,), 0.02, device=dev)
    pz = torch.full((p,), 128.0, device=dev)
    ids = torch.arange(k, device="cpu") % 16
    lay = k8.block_layout(ids, 32).to(dev)
    bs, bz = torch.full((lay.padded_k // 32,), 0.02, device=dev), torch.full((lay.padded_k // 32,), 128.0, device=dev)
    a8 = torch.randint(-128, 127, (m, k), device=dev, dtype=torch.int8)
    r = torch.zeros(m, device=dev)
    y = torch.empty(m, n, device=dev, dtype=torch.float16)
    ops = 2.0 * m * n * k
    out = {"M": m, "K": k, "N": n, "padded_K_blocked": lay.padded_k}
    out["fp16_ms"] = _time(lambda: torch.nn.functional.linear(x, w, bias))
    out["int8_rows_fused_ms"] = _time(lambda: k8.int8_linear_triton(x, wq, bias, row_scale=ps, row_offset_zp=pz))
    out["int8_blocked_fused_ms"] = _time(lambda: k8.int8_linear_triton(x, wq, bias, layout=lay, block_scale=bs,
                                                                       block_zp=bz))
    perm = lay.perm

    def gemm_only():
        k8._int8_gemm_kernel[(math.ceil(m / 128) * math.ceil(n / 128),)](
            a8, wq.codes, y, perm, bs, bs, ps, pz, wq.code_sum, wq.scale, wq.offset, r, bias, m, n, k, k, p,
            BLOCKED=False, ROW_PARAMS=True, HAS_BIAS=True, BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8,
            num_stages=3)

    out["int8_gemm_kernel_only_ms"] = _time(gemm_only)
    out["int8_quantize_only_ms"] = round(out["int8_rows_fused_ms"] - out["int8_gemm_kernel_only_ms"], 4)
    try:
        wt = wq.codes.t()
        out["cublas_int_mm_ms"] = _time(lambda: torch._int_mm(a8, wt))
    except RuntimeError as e:
        out["cublas_int_mm_error"] = str(e)[:200]
    try:
        a_f8 = x.reshape(m, k).to(torch.float8_e4m3fn)
        w_f8 = w.to(torch.float8_e4m3fn)
        sa = torch.ones(m, 1, device=dev)
        sb = torch.ones(1, n, device=dev)
        out["fp8_scaled_mm_ms"] = _time(lambda: torch._scaled_mm(a_f8, w_f8.t(), scale_a=sa, scale_b=sb,
                                                                  out_dtype=torch.bfloat16))
    except RuntimeError as e:
        out["fp8_error"] = str(e)[:200]
    for key in [kk for kk in out if kk.endswith("_ms") and "only" not in kk]:
        out[key.replace("_ms", "_tops")] = round(ops / (out[key] * 1e-3) / 1e12, 1)
    return out


# ---- report -----------------------------------------------------------------------------------------------
def _f(v, nd=2):
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def markdown(res) -> str:
    st, m = res["settings"], res["machine"]
    lines = [f"# Real 8-bit DGQ at SD v1.5 scale ({m.get('gpu', st['device'])}, {'tiny' if st['tiny'] else 'SD v1.5 UNet'}"
             f", random weights, {st['dtype']})", "",
             f"torch {m.get('torch')}, triton {m.get('triton')}, diffusers {m.get('diffusers')}, git {m.get('git')}; "
             f"step = median of {st['step_calls']} UNet calls after {st['warmup_calls']} warm-up; elapsed "
             f"{res.get('elapsed_s')} s. Command: `python benchmarks/bench_8bit.py {' '.join(st.get('argv', []))}`", "",
             "| variant | batch | step (ms) | fp16 compiled (ms) | speed-up vs fp16 compiled | UNet weight bytes (MiB) | "
             "vs fp16 | peak mem (MiB) | PSNR step vs fake-quant (dB) | PSNR latents vs fake-quant (dB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        mib = (lambda v: None if v is None else v / 2**20)
        lines.append(f"| {r['variant']} | {r['batch']} | {_f(r['step_ms'])} | {_f(r.get('step_ms_fp16_compiled'))} | "
                     f"{_f(r.get('speedup_vs_fp16_compiled'), 3)} | {_f(mib(r['weight_bytes']), 1)} | "
                     f"{_f(r.get('weight_ratio_vs_fp16'), 3)} | {_f(mib(r['peak_mem_bytes']), 1)} | "
                     f"{_f(r['psnr_vs_fakequant'])} | {_f(r.get('psnr_latents_vs_fakequant'))} |")
    for b, c in res["conversion"].items():
        lines += ["", f"**{b}**: {c['message']} (conversion {c['seconds']} s)"]
    if res["gemm"]:
        lines += ["", "## GEMMs at SD shapes (ms; TOP/s in parentheses)", "",
                  "| M | K | N | fp16 | int8 fused rows | int8 fused blocked (K padded) | int8 GEMM kernel only | "
                  "quantize (fused - GEMM) | cuBLAS _int_mm | fp8 _scaled_mm |", "|---|---|---|---|---|---|---|---|---|---|"]
        for g in res["gemm"]:
            c = (lambda key: f"{_f(g.get(key + '_ms'), 3)} ({_f(g.get(key + '_tops'), 0)})")
            lines.append(f"| {g['M']} | {g['K']} | {g['N']} | {c('fp16')} | {c('int8_rows_fused')} | "
                         f"{c('int8_blocked_fused')} ({g['padded_K_blocked']}) | {_f(g.get('int8_gemm_kernel_only_ms'), 3)}"
                         f" | {_f(g.get('int8_quantize_only_ms'), 3)} | {c('cublas_int_mm')} | {c('fp8_scaled_mm')} |")
    for name, prof in res["profile"].items():
        lines += ["", f"## Profile of one {name} UNet call (batch 2x{max(st['batches'])}, self device time)", "",
                  "| op | ms | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{p['op'][:70]}` | {p['self_ms']:.2f} | {100 * p['share']:.1f} % | {p['calls']} |" for p in prof]
    if res["errors"] or res["skipped"]:
        lines += ["", "## Errors / skipped", ""] + [f"- {e['section']}: {e['error'][:300]}" for e in res["errors"]]
        lines += [f"- skipped: {s}" for s in res["skipped"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--gen-steps", type=int, default=25, help="steps of the batch-1 generation compared by PSNR")
    p.add_argument("--warmup-calls", type=int, default=2)
    p.add_argument("--step-calls", type=int, default=8)
    p.add_argument("--calib-prompts", type=int, default=2)
    p.add_argument("--calib-batch", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-gemm", action="store_true")
    p.add_argument("--deadline", type=float, default=480.0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "8bit_sd15_h200"))
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    torch.manual_seed(0)
    run = Run(args)
    dtype = getattr(torch, args.dtype)
    pipe = run.section("build", lambda: sd.build(args.tiny, args.device, dtype))
    if pipe is None:
        return 1
    cuda = pipe.device.type == "cuda"
    if cuda and not args.no_gemm:
        for shape in GEMM_SHAPES:
            g = run.section(f"gemm {shape}", lambda shape=shape: gemm_bench(*shape), need_s=20)
            if g:
                run.res["gemm"].append(g)
    run.section("fp16 eager", lambda: measure(run, pipe, "fp16-eager"))
    if not args.no_compile:
        def comp():
            cu = sd.compiled(pipe.unet)
            for b in args.batches:
                t = sd.time_steps(pipe, cu, b, args.steps, args.warmup_calls, args.step_calls)
                run.res["rows"].append({"variant": "fp16-compiled", "batch": f"2x{b}", "step_ms": t["median_ms"],
                                        "step_min_ms": t["min_ms"], "weight_bytes": unet_weight_bytes(pipe.unet),
                                        "peak_mem_bytes": None, "psnr_vs_fakequant": None})
        run.section("fp16 compiled", comp, need_s=120)
    tmp = tempfile.TemporaryDirectory(prefix="dgq_b8_")
    state = Path(tmp.name) / "dgq-w8a8.safetensors"

    def calib():
        c = sd.calibrate_once(pipe, "dgq-w8a8", args.calib_prompts, args, pipe.device)
        save_quant_state(pipe, state)
        run.res["calibration"] = c
        return c

    if run.section("dgq-w8a8 calibration", calib, need_s=40) is None:
        return 1
    ref = run.section("fake-quant dgq-w8a8", lambda: measure(run, pipe, "fake-quant-dgq-w8a8"))
    del pipe
    if cuda:
        torch.cuda.empty_cache()
    for backend in ("int8", "fp8"):
        run.section(f"{backend} dgq-w8a8", lambda backend=backend: variant_8bit(run, state, backend, ref), need_s=30)
        if cuda:
            torch.cuda.empty_cache()
    tmp.cleanup()
    run.save()
    print(markdown(run.res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
