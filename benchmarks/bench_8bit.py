"""Real 8-bit DGQ at SD v1.5 scale (issue #14): UNet step of fp16 eager / compiled / CUDA graph, fake-quant
``dgq-w8a8``, int8 and fp8 ``dgq-w8a8`` (eager and CUDA graph), torchao int8 / float8 dynamic; weight bytes, peak
memory, agreement with fake quantization, a profile of the int8 step, GEMM micro-benchmarks.

Model: the SD v1.5 UNet architecture with random weights (``bench_sd_scale.build``, config in
:mod:`dgq_utils.testing.sd_scale`: no download), seeded text states, PNDM. ``dgq-w8a8`` is calibrated once
(``--calib-prompts`` prompts x ``--steps`` steps) and its state saved; ``int8`` and ``fp8`` are
:func:`dgq_utils.quantize.int8.convert_to_8bit` of that state loaded onto a fresh UNet.

Per variant and batch 2 x ``b`` (CFG): the median UNet step (CUDA events, consecutive calls of one trajectory,
so the per-timestep parameter sets change every call), UNet weight bytes, the peak allocated memory while
stepping, ``psnr_vs_fakequant`` (the first UNet output of a trajectory against the fake-quant path's) and
``psnr_vs_fp16`` (against fp16 eager), and, at batch 1, the wall time and latent PSNR of a ``--gen-steps`` step
generation (no VAE). ``*-cudagraph`` variants capture one CUDA graph per UNet call of the trajectory (the
per-timestep parameters are baked into each graph; replayed in order, they remove the host's launch overhead).

Sections are guarded: a failing one is recorded under ``errors`` and the rest go on; the JSON / markdown are
rewritten after every section. ``--sections`` runs a subset and ``--resume`` adds to an existing result file
(the GPU run uses two processes, so a crash of the Triton path cannot take the fp16 / torchao rows with it).

    python benchmarks/bench_8bit.py                          # one H200, everything
    python benchmarks/bench_8bit.py --tiny --device cpu --out /tmp/b8 --no-compile   # smoke test (CPU references)
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
from dgq_utils.quantize.pipeline import get_quant_state  # noqa: E402
from dgq_utils.quantize.state import load_quant_state, save_quant_state  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_sd_scale", ROOT / "benchmarks" / "bench_sd_scale.py")
sd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sd)

#: (M, K, N) of SD v1.5 GEMMs at batch 2 x 8 (64x64 latents): tokens x in -> out
GEMM_SHAPES = ((65536, 320, 320), (65536, 320, 2560), (65536, 1280, 320), (16384, 640, 640), (16384, 640, 5120),
               (4096, 1280, 1280), (4096, 1280, 10240), (4096, 5120, 1280))
SECTIONS = ("fp16", "dgq", "cudagraph", "fp16-compiled", "torchao", "gemm")


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    mse = float(((a - ref) ** 2).mean())
    return float("inf") if mse == 0 else round(10 * math.log10(float(ref.abs().max()) ** 2 / mse), 2)


def _tensor_bytes(t) -> int:
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    if isinstance(t, torch.nn.Parameter) and type(t.data) is not torch.Tensor:
        return _tensor_bytes(t.data)
    return t.numel() * t.element_size()


def weight_bytes(unet) -> int:
    """:func:`unet_weight_bytes`, or (tensor subclasses, e.g. torchao's) the sum over their inner tensors."""
    try:
        return unet_weight_bytes(unet)
    except Exception:  # noqa: BLE001
        return sum(_tensor_bytes(t) for t in list(unet.parameters()) + list(unet.buffers()) if t is not None)


class Run:
    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.res = {"settings": {k: v for k, v in vars(args).items()}, "machine": sd.machine(), "rows": [],
                    "gemm": [], "conversion": {}, "calibration": {}, "profile": {}, "errors": [], "skipped": [],
                    "notes": [], "tuned_configs": {}}
        out = Path(args.out).with_suffix(".json")
        if args.resume and out.is_file():
            old = json.loads(out.read_text())
            for key in ("rows", "gemm", "errors", "skipped", "notes"):
                self.res[key] = old.get(key, []) + self.res[key]
            for key in ("conversion", "calibration", "profile", "tuned_configs"):
                self.res[key] = {**old.get(key, {}), **self.res[key]}
            self.res["elapsed_before_s"] = old.get("elapsed_s", 0) + old.get("elapsed_before_s", 0)

    def left(self) -> float:
        return self.args.deadline - (time.perf_counter() - self.t0)

    def section(self, name, fn, need_s=0.0):
        if self.left() < need_s:
            self.res["skipped"].append(name)
            print(f"[skip] {name}: {self.left():.0f} s left", flush=True)
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
        self.res["tuned_configs"].update({str(k): v for k, v in k8.tuned_configs().items()})
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


# ---- measuring ----------------------------------------------------------------------------------------------
class Refs:
    """First UNet outputs (per batch) and batch-1 latents of the fp16 and fake-quant runs, kept on disk so a
    second process can compare against them."""

    def __init__(self, path: Path):
        self.path = path
        self.data = torch.load(path) if path.is_file() else {}

    def put(self, key, value):
        self.data[key] = value
        torch.save(self.data, self.path)

    def get(self, key):
        return self.data.get(key)


def _row(run, pipe, variant, batch, timing, peak, first, refs, extra=None):
    row = {"variant": variant, "batch": f"2x{batch}", "step_ms": timing["median_ms"], "step_min_ms": timing["min_ms"],
           "weight_bytes": weight_bytes(pipe.unet), "peak_mem_bytes": peak,
           "psnr_vs_fakequant": None, "psnr_vs_fp16": None}
    fq, fp = refs.get(f"fq_b{batch}"), refs.get(f"fp_b{batch}")
    if first is not None:
        if fq is not None and not (variant.startswith("fake-quant-") and variant.endswith("-eager")):
            row["psnr_vs_fakequant"] = psnr(first, fq)
        if fp is not None and variant != "fp16-eager":
            row["psnr_vs_fp16"] = psnr(first, fp)
    row.update(extra or {})
    run.res["rows"].append(row)
    run.save()
    return row


def label(run, recipe) -> str:
    """The calibrated recipe's name for the row labels: the one given, or the one a loaded state's calibration
    record names (the GPU run calibrates in another process)."""
    name = recipe if isinstance(recipe, str) else recipe.name
    if run.args.state:
        name = run.res.get("calibration", {}).get("recipe", name)
    return name


def measure(run, pipe, variant, refs, unet_call=None, ref_key=None, gen=True, batches=None):
    """Eager (or compiled: ``unet_call``) step latency, memory and agreement of one variant, one row per batch."""
    a = run.args
    dev = pipe.device
    call = unet_call if unet_call is not None else pipe.unet
    rows = []
    for b in (batches or a.batches):
        sd.sync(dev)
        sd.reset_peak(dev)
        t = sd.time_steps(pipe, call, b, a.steps, a.warmup_calls, a.step_calls)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        first = sd.first_output(pipe, call, b, a.steps).cpu()
        if ref_key:
            refs.put(f"{ref_key}_b{b}", first)
        rows.append(_row(run, pipe, variant, b, t, peak, first, refs))
    if gen and a.gen_steps:
        sd.sync(dev)
        t0 = time.perf_counter()
        lat = pipe(prompt=sd.prompts(1), num_inference_steps=a.gen_steps, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(0), unet=call).images.float().cpu()
        sd.sync(dev)
        wall = round(time.perf_counter() - t0, 3)
        if ref_key:
            refs.put(f"{ref_key}_gen", lat)
        fq, fp = refs.get("fq_gen"), refs.get("fp_gen")
        for r in rows:
            r[f"gen_{a.gen_steps}_steps_b1_s"] = wall
            if fq is not None and ref_key != "fq":
                r["psnr_latents_vs_fakequant"] = psnr(lat, fq)
            if fp is not None and ref_key != "fp":
                r["psnr_latents_vs_fp16"] = psnr(lat, fp)
        run.save()
    return rows


@torch.no_grad()
def measure_cudagraph(run, pipe, variant, refs):
    """One CUDA graph per UNet call of the trajectory (``warmup + step`` calls), replayed in order."""
    a = run.args
    dev = pipe.device
    qs = get_quant_state(pipe)
    n = a.warmup_calls + a.step_calls
    for b in a.batches:
        lat, cond = sd.step_inputs(pipe, b)
        sched = pipe.scheduler
        sched.set_timesteps(a.steps, device=dev)
        ts = sched.timesteps
        sd.sync(dev)
        sd.reset_peak(dev)

        def call(i):
            if qs is not None:
                qs.state.call_index = i - 1  # the timestep hook maps this call to set i
            return pipe.unet(lat, ts[i], encoder_hidden_states=cond).sample

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(n):  # warm every set eagerly: compiles, tunes, moves parameters, allocates workspaces
                call(i)
        torch.cuda.current_stream().wait_stream(stream)
        sd.sync(dev)
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        t0 = time.perf_counter()
        for i in range(n):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = call(i)
            graphs.append((g, out))
        capture_s = round(time.perf_counter() - t0, 2)
        times = []
        for i, (g, _) in enumerate(graphs):
            if qs is not None:
                qs.state.set_index = i
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            g.replay()
            e1.record()
            e1.synchronize()
            if i >= a.warmup_calls:
                times.append(e0.elapsed_time(e1))
        if qs is not None:
            qs.state.set_index = 0
        graphs[0][0].replay()
        sd.sync(dev)
        first = graphs[0][1].float().cpu()
        peak = torch.cuda.max_memory_allocated(dev)
        timing = {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3)}
        _row(run, pipe, variant, b, timing, peak, first, refs, {"capture_s": capture_s, "graphs": n})
        del graphs
        torch.cuda.empty_cache()


def load_8bit(run, state, backend):
    pipe = sd.build(run.args.tiny, run.args.device, getattr(torch, run.args.dtype))
    load_quant_state(pipe, state)
    t = time.perf_counter()
    rep = convert_to_8bit(pipe, backend)
    run.res["conversion"][backend] = {"seconds": round(time.perf_counter() - t, 2), "converted": len(rep.converted),
                                      "weights_only": len(rep.weights_only),
                                      "fallback": {k: len(v) for k, v in rep.fallback.items()},
                                      "plans": rep.plans, "attention_simulated": rep.attention,
                                      "message": rep.message, "weight_bytes_before": rep.weight_bytes_before,
                                      "weight_bytes_after": rep.weight_bytes_after}
    run.save()
    return pipe


# ---- torchao ------------------------------------------------------------------------------------------------
def torchao_variant(run, refs, which: str, compile_it: bool):
    try:
        import torchao
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                          Int8DynamicActivationInt8WeightConfig, quantize_)
    except Exception as err:  # noqa: BLE001
        note = f"torchao not available ({type(err).__name__}: {str(err)[:200]}): its rows are missing"
        if note not in run.res["notes"]:
            run.res["notes"].append(note)
        return None
    pipe = sd.build(run.args.tiny, run.args.device, getattr(torch, run.args.dtype))
    # float8: per-tensor scales (torchao's row-wise granularity needs bf16 weights; the UNet is fp16)
    cfg = Int8DynamicActivationInt8WeightConfig() if which == "int8" else Float8DynamicActivationFloat8WeightConfig()
    quantize_(pipe.unet, cfg)  # nn.Linear only (torchao's default filter); convolutions stay fp16
    run.res.setdefault("torchao", {})["version"] = torchao.__version__
    name = f"torchao-{which}-dynamic"
    if compile_it:
        measure(run, pipe, f"{name}-compiled", refs, unet_call=sd.compiled(pipe.unet), gen=False,
                batches=run.args.compile_batches)
    else:
        measure(run, pipe, f"{name}-eager", refs, gen=False)
    del pipe
    torch.cuda.empty_cache()
    return True


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
    rows = k8.rows_params(torch.full((p,), 0.02, device=dev), torch.full((p,), 128.0, device=dev))
    # 16 uneven scattered groups, like K-means (sizes ~ geometric): the padding the model sees
    gen = torch.Generator().manual_seed(0)
    ids = torch.multinomial(torch.tensor([0.7 ** i for i in range(16)]), k, replacement=True, generator=gen)
    lay = k8.block_layout(ids, 32)
    blocked = k8.blocked_params(lay, torch.full((lay.num_blocks,), 0.02), torch.full((lay.num_blocks,), 128.0)).to(dev)
    a8 = torch.randint(-128, 127, (m, k), device=dev, dtype=torch.int8)
    ops = 2.0 * m * n * k
    out = {"M": m, "K": k, "N": n, "padded_K_blocked": lay.padded_k}
    out["fp16_ms"] = _time(lambda: torch.nn.functional.linear(x, w, bias))
    out["int8_rows_fused_ms"] = _time(lambda: k8.int8_linear(x, wq, bias, rows))
    out["int8_blocked_fused_ms"] = _time(lambda: k8.int8_linear(x, wq, bias, blocked))
    a_r, r_r = k8.quantize_act_int8(x, rows)
    a_b, r_b = k8.quantize_act_int8(x, blocked)
    out["int8_rows_quantize_ms"] = _time(lambda: k8.quantize_act_int8(x, rows))
    out["int8_rows_gemm_ms"] = _time(lambda: k8.int8_gemm(a_r, r_r, wq, bias, rows, p, torch.float16))
    out["int8_blocked_quantize_ms"] = _time(lambda: k8.quantize_act_int8(x, blocked))
    out["int8_blocked_gemm_ms"] = _time(lambda: k8.int8_gemm(a_b, r_b, wq, bias, blocked, p, torch.float16))
    out["tuned_rows"] = k8.tuned_configs().get((m, n, k, 0))
    out["tuned_blocked"] = k8.tuned_configs().get((m, n, k, 32))
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
    for key in [kk for kk in out if kk.endswith("_ms") and "quantize" not in kk]:
        out[key.replace("_ms", "_tops")] = round(ops / (out[key] * 1e-3) / 1e12, 1)
    return out


# ---- report -----------------------------------------------------------------------------------------------
def _f(v, nd=2):
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def markdown(res) -> str:
    st, m = res["settings"], res["machine"]
    gen_key = f"gen_{st['gen_steps']}_steps_b1_s"
    lines = [f"# Real 8-bit DGQ at SD v1.5 scale ({m.get('gpu', st['device'])}, {'tiny' if st['tiny'] else 'SD v1.5 UNet'}"
             f", random weights, {st['dtype']})", "",
             f"torch {m.get('torch')}, triton {m.get('triton')}, diffusers {m.get('diffusers')}, "
             f"torchao {res.get('torchao', {}).get('version', '–')}, git {m.get('git')}; step = median of "
             f"{st['step_calls']} consecutive UNet calls of a {st['steps']}-step PNDM trajectory after "
             f"{st['warmup_calls']} warm-up calls (CUDA events); elapsed {res.get('elapsed_s')} s "
             f"(+{res.get('elapsed_before_s', 0)} s in an earlier process). Command: "
             f"`python benchmarks/bench_8bit.py {' '.join(st.get('argv', []))}`", "",
             "| variant | batch | step (ms) | fp16 compiled (ms) | speed-up vs fp16 compiled | UNet weights (MiB) | "
             "vs fp16 | peak mem (MiB) | PSNR vs fake-quant (dB) | PSNR vs fp16 (dB) | "
             f"{st['gen_steps']}-step gen. b1 (s) | PSNR latents vs fake-quant (dB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mib = (lambda v: None if v is None else v / 2**20)
    for r in res["rows"]:
        lines.append(f"| {r['variant']} | {r['batch']} | {_f(r['step_ms'])} | {_f(r.get('step_ms_fp16_compiled'))} | "
                     f"{_f(r.get('speedup_vs_fp16_compiled'), 3)} | {_f(mib(r['weight_bytes']), 1)} | "
                     f"{_f(r.get('weight_ratio_vs_fp16'), 3)} | {_f(mib(r['peak_mem_bytes']), 1)} | "
                     f"{_f(r['psnr_vs_fakequant'])} | {_f(r.get('psnr_vs_fp16'))} | {_f(r.get(gen_key))} | "
                     f"{_f(r.get('psnr_latents_vs_fakequant'))} |")
    if res.get("calibration"):
        c = res["calibration"]
        lines += ["", f"**Calibration** of `dgq-w8a8`: {c.get('prompts')} prompts x {st['steps']} steps, wall "
                      f"{c.get('wall_s')} s (passes {c.get('seconds_passes')} s, finishing parameters "
                      f"{c.get('seconds_finalize')} s)."]
    for b, c in res["conversion"].items():
        lines += ["", f"**{b}**: {c['message']} (conversion {c['seconds']} s)"]
    for note in res.get("notes", []):
        lines += ["", f"Note: {note}"]
    if res["gemm"]:
        lines += ["", "## GEMMs at SD shapes (ms; TOP/s in parentheses; fused = quantize kernel + GEMM)", "",
                  "| M | K | N | fp16 | int8 fused rows | = quantize + GEMM | int8 fused blocked (K padded) | "
                  "= quantize + gather/GEMM | cuBLAS _int_mm (pre-quantized) | fp8 _scaled_mm (pre-quantized) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for g in res["gemm"]:
            c = (lambda key: f"{_f(g.get(key + '_ms'), 3)} ({_f(g.get(key + '_tops'), 0)})")
            lines.append(f"| {g['M']} | {g['K']} | {g['N']} | {c('fp16')} | {c('int8_rows_fused')} | "
                         f"{_f(g.get('int8_rows_quantize_ms'), 3)} + {c('int8_rows_gemm')} | "
                         f"{c('int8_blocked_fused')} ({g['padded_K_blocked']}) | "
                         f"{_f(g.get('int8_blocked_quantize_ms'), 3)} + {c('int8_blocked_gemm')} | "
                         f"{c('cublas_int_mm')} | {c('fp8_scaled_mm')} |")
    for name, prof in res["profile"].items():
        lines += ["", f"## Profile of one {name} UNet call (batch 2x{max(st['batches'])}, self device time)", "",
                  "| op | ms | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{p['op'][:70]}` | {p['self_ms']:.2f} | {100 * p['share']:.1f} % | {p['calls']} |" for p in prof]
    if res["errors"] or res["skipped"]:
        lines += ["", "## Errors / skipped", ""] + [f"- {e['section']}: {e['error'][:300]}" for e in res["errors"]]
        lines += [f"- skipped: {s}" for s in res["skipped"]]
    return "\n".join(lines) + "\n"


# ---- the run ------------------------------------------------------------------------------------------------
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
    p.add_argument("--calib-only", default=None, help="only calibrate dgq-w8a8 and save its state to this file")
    p.add_argument("--state", default=None, help="a saved dgq-w8a8 state to use instead of calibrating")
    p.add_argument("--grouping", default=None, help="override the recipe's activation grouping (e.g. contiguous)")
    p.add_argument("--host-stats", action="store_true",
                   help="calibration statistics finished per call on the host (not the deferred GPU path)")
    p.add_argument("--compile-batches", type=int, nargs="+", default=[8])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--no-compile", action="store_true", help="no torch.compile rows (fp16 / torchao)")
    p.add_argument("--refs", default=None, help="file holding the reference outputs between processes")
    p.add_argument("--resume", action="store_true", help="add to the existing result file")
    p.add_argument("--deadline", type=float, default=480.0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "8bit_sd15_h200"))
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    torch.manual_seed(0)
    run = Run(args)
    refs = Refs(Path(args.refs) if args.refs else Path(tempfile.gettempdir()) / "dgq_b8_refs.pt")
    dtype = getattr(torch, args.dtype)
    secs = set(args.sections)
    cuda = torch.device(args.device).type == "cuda"
    pipe = run.section("build", lambda: sd.build(args.tiny, args.device, dtype))
    if pipe is None:
        return 1
    if "fp16" in secs:
        run.section("fp16 eager", lambda: measure(run, pipe, "fp16-eager", refs, ref_key="fp"))
    recipe = "dgq-w8a8"
    if args.grouping:
        from dgq_utils.config import get_preset

        base = get_preset("dgq-w8a8")
        recipe = base.replace(name=f"dgq-w8a8-{args.grouping}",
                              activations=base.activations.replace(grouping=args.grouping))
    if args.host_stats:
        from dgq_utils.core.stats import TensorStats

        _update = TensorStats.update

        def host_update(self, *a, **kw):
            self.deferred = False
            return _update(self, *a, **kw)

        TensorStats.update = host_update
    if args.calib_only:
        import faulthandler

        faulthandler.dump_traceback_later(25, repeat=True)

        def calib_only():
            c = sd.calibrate_once(pipe, recipe, args.calib_prompts, args, pipe.device)
            save_quant_state(pipe, args.calib_only)
            c["recipe"] = recipe if isinstance(recipe, str) else recipe.name
            c["host_stats"] = bool(args.host_stats)
            run.res["calibration"] = c
            return c

        ok = run.section("dgq-w8a8 calibration", calib_only)
        faulthandler.cancel_dump_traceback_later()
        return 0 if ok is not None else 1
    if "dgq" in secs:
        tmp = tempfile.TemporaryDirectory(prefix="dgq_b8_")
        state = Path(args.state) if args.state else Path(tmp.name) / "dgq-w8a8.safetensors"

        def calib():
            if args.state:
                load_quant_state(pipe, state)
                return run.res.get("calibration") or {"loaded": str(state)}
            c = sd.calibrate_once(pipe, recipe, args.calib_prompts, args, pipe.device)
            save_quant_state(pipe, state)
            run.res["calibration"] = c
            return c

        if run.section("dgq-w8a8 calibration", calib, need_s=40) is not None:
            tag = label(run, recipe)
            run.section("fake-quant dgq-w8a8", lambda: measure(run, pipe, f"fake-quant-{tag}-eager", refs,
                                                               ref_key="fq"))
            if cuda and "cudagraph" in secs:
                run.section("fake-quant dgq-w8a8 cudagraph",
                            lambda: measure_cudagraph(run, pipe, f"fake-quant-{tag}-cudagraph", refs), need_s=20)
            from dgq_utils.quantize.pipeline import dequantize_pipeline

            dequantize_pipeline(pipe)
            for backend in ("int8", "fp8"):
                holder = {}

                def eager(backend=backend, holder=holder):
                    holder["pipe"] = load_8bit(run, state, backend)
                    measure(run, holder["pipe"], f"{backend}-{tag}-eager", refs)

                run.section(f"{backend} dgq-w8a8 eager", eager, need_s=30)
                q = holder.get("pipe")
                if q is not None and cuda and "cudagraph" in secs:
                    run.section(f"{backend} dgq-w8a8 cudagraph",
                                lambda q=q, backend=backend: measure_cudagraph(run, q, f"{backend}-{tag}-cudagraph",
                                                                               refs), need_s=20)
                if q is not None and backend == "int8" and cuda:
                    def prof(q=q):
                        run.res["profile"][f"int8-{tag}-eager"] = sd.profile_step(q, max(args.batches), args.steps,
                                                                                    rows=16)
                    run.section("int8 profile", prof, need_s=15)
                holder.clear()
                del q
                if cuda:
                    torch.cuda.empty_cache()
        tmp.cleanup()
    if cuda and "cudagraph" in secs and "fp16" in secs:
        run.section("fp16 cudagraph", lambda: measure_cudagraph(run, pipe, "fp16-cudagraph", refs), need_s=15)
    if cuda and "gemm" in secs:
        for shape in GEMM_SHAPES:
            g = run.section(f"gemm {shape}", lambda shape=shape: gemm_bench(*shape), need_s=5)
            if g:
                run.res["gemm"].append(g)
    if "fp16-compiled" in secs and not args.no_compile:
        run.section("fp16 compiled", lambda: measure(run, pipe, "fp16-compiled", refs, unet_call=sd.compiled(pipe.unet),
                                                     gen=False, batches=args.compile_batches),
                    need_s=50 * len(args.compile_batches))
    del pipe
    if cuda:
        torch.cuda.empty_cache()
    if "torchao" in secs:
        run.section("torchao int8 dynamic", lambda: torchao_variant(run, refs, "int8", False), need_s=30)
        run.section("torchao float8 dynamic", lambda: torchao_variant(run, refs, "float8", False), need_s=30)
        if not args.no_compile:
            run.section("torchao float8 dynamic compiled",
                        lambda: torchao_variant(run, refs, "float8", True), need_s=120)
    run.save()
    print(markdown(run.res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
