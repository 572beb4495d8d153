"""Run the report: the numbered notebooks executed in order by papermill, each exported to HTML.

    python -m dgq_utils.report                       # full default chain on the embedded model
    python -m dgq_utils.report --quick               # tiny N (what CI runs)
    python -m dgq_utils.report -p model_id /path/to/stable-diffusion-v1-4 -p device cuda -p n_prompts 2000

Every notebook gets the parameters its `parameters` cell declares (so ``-p n_prompts 2000`` reaches 04-06 and
not 01-03); a name that no notebook of the chain declares (a typo such as ``-p n_promts``) stops the chain
before anything runs, instead of being silently ignored; so does a value of the wrong type or out of range
(``-p n_prompts abc``, ``-p n_prompts -5``: checked against the notebooks' declared defaults by
:mod:`dgq_utils.report.parameters`, naming the parameter). Executed copies and HTML exports go to the output
folder; the source notebooks stay output-free. A failing cell stops the chain with a message naming the
notebook, the cell and the error.

**Lanes.** The notebooks share their expensive work only through the caches of the work folder (images,
calibrated states, K-means fits), each guarded by a file lock, and none reads another's tables. So the chain can run
them in several *lanes*, one kernel per lane at a time: on a CPU machine with two cores or fewer, where every
notebook runs one torch thread (:func:`dgq_utils.report.context.open_model`), the default is two lanes --
``03 06 07`` beside ``01 02 04 05`` (:func:`plan_lanes`, by the measured seconds :data:`EXPECTED_SECONDS`) -- which
keeps both cores busy; elsewhere one lane. ``--lanes 1`` runs them one after another in numeric order. Whatever
the lanes, the results are the same files: a cache entry is made once, by whichever notebook asks first.

papermill does the execution and parameter injection and nbconvert the HTML export; this module only orders
the notebooks, times them and turns papermill's exception into a readable message.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dgq_utils import paths, timing
from dgq_utils.atomic import atomic_write_json
from dgq_utils.report import compare_runs, runs as run_folders
from dgq_utils.report.parameters import check_chain_parameters

ROOT = paths.REPO_ROOT
NOTEBOOK_DIR = ROOT / "notebooks"
DEFAULT_OUT = paths.output_dir() / "report"

#: parameters that --quick sets (every notebook reads the ones it declares)
QUICK_PARAMETERS = {"quick": True}

#: seconds of each notebook of the default CPU chain, two lanes on 2 cores, from a fresh clone
#: (benchmarks/results/chain_timings/fresh_clone_2026-12-03/run.json; 07 from
#: benchmarks/results/calibration_sensitivity/README.md): the weights :func:`plan_lanes` balances the lanes by;
#: a notebook not listed weighs 60 s
EXPECTED_SECONDS = {"01": 42.0, "02": 58.0, "03": 26.0, "04": 228.0, "05": 325.0, "06": 520.0, "07": 110.0}


class ChainError(RuntimeError):
    """A notebook of the chain failed; the message names the notebook and the cell."""


@dataclass
class NotebookRun:
    notebook: str
    seconds: float
    output: Path
    html: Path | None


def list_notebooks(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) of ``folder``, in order."""
    books = sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))
    if not books:
        raise FileNotFoundError(f"No numbered notebooks (NN_name.ipynb) in {folder}.")
    return books


def _parse_value(text: str):
    """Command-line parameter values: Python literals where they parse (3, 0.5, True, [1, 2]), else strings."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def export_html(executed: Path) -> Path:
    """Write ``executed`` as a standalone HTML file beside it (nbconvert's HTML exporter)."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    html = executed.with_suffix(".html")
    tmp = html.with_suffix(".html.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(html)
    return html


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_lanes(parameters: dict) -> int:
    """2 on a CPU run on a machine with at most two cores and no explicit ``threads`` (each notebook then runs
    one torch thread, so a second lane uses the idle core); 1 otherwise (a GPU run, or torch already using
    every core)."""
    device = str(parameters.get("device", "cpu"))
    if device.startswith("cuda") or parameters.get("threads") is not None:
        return 1
    return 2 if available_cpus() <= 2 else 1


#: environment variables that cap a notebook kernel's CPU threads / worker processes (torch's default intra-op
#: threads follow OMP_NUM_THREADS; K-means workers DGQ_KMEANS_JOBS, :func:`dgq_utils.core.grouping.kmeans_workers`)
LANE_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DGQ_KMEANS_JOBS")


def lane_cpu_env(lanes: int, cpus: int | None = None, environ=None) -> dict[str, str]:
    """The CPU share of each lane's kernel when ``lanes`` notebooks run side by side: ``cpus // lanes`` (at least 1)
    for every variable of :data:`LANE_THREAD_VARS` the user has not set. One lane: nothing (a lone notebook uses
    the whole machine); on a machine with at most two CPUs nothing either (there each notebook already runs one
    torch thread, :func:`dgq_utils.report.context.open_model`, and the two K-means workers per lane are the form
    the CPU timings were measured with). Before it, each of 4 lanes on the 16-core H200 host started 16 torch
    threads and up to 16 K-means workers, and notebook 02 took 294 s instead of its 50 s alone, 03 379 s instead of
    28 s (2026-12-04; oversubscription is the suspected cause, the capped form is not yet measured there)."""
    cpus = available_cpus() if cpus is None else int(cpus)
    if lanes <= 1 or cpus <= 2:
        return {}
    environ = os.environ if environ is None else environ
    share = max(1, cpus // int(lanes))
    return {name: str(share) for name in LANE_THREAD_VARS if not str(environ.get(name, "")).strip()}


def plan_lanes(books: list[Path], lanes: int) -> list[list[Path]]:
    """Spread ``books`` over at most ``lanes`` lanes: longest first onto the least loaded lane (weights
    :data:`EXPECTED_SECONDS` by notebook number), then each lane in numeric order. Empty lanes are dropped."""
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1:
        raise ValueError(f"lanes: got {lanes!r}; allowed: an integer >= 1 (1 runs the notebooks one after "
                         "another).")
    load = [0.0] * lanes
    plan: list[list[Path]] = [[] for _ in range(lanes)]
    for book in sorted(books, key=lambda b: (-EXPECTED_SECONDS.get(Path(b).name[:2], 60.0), Path(b).name)):
        i = min(range(lanes), key=lambda j: (load[j], j))
        plan[i].append(book)
        load[i] += EXPECTED_SECONDS.get(Path(book).name[:2], 60.0)
    return [sorted(lane, key=lambda b: Path(b).name) for lane in plan if lane]


def run_chain(
    parameters: dict | None = None,
    *,
    out_dir: Path | str = DEFAULT_OUT,
    notebooks: list[Path] | None = None,
    html: bool = True,
    kernel_name: str | None = None,
    lanes: int | None = None,
    log=None,
    on_done=None,
) -> list[NotebookRun]:
    """Execute ``notebooks`` (default: all numbered notebooks) with ``parameters``, in ``lanes`` lanes
    (``None``: :func:`default_lanes`; see the module docstring), each lane in numeric order.

    Raises :class:`ChainError` naming the notebook and cell at the first failure (no further notebook is
    started; one already running in another lane finishes); the partially executed notebook is kept in
    ``out_dir`` for inspection. Returns the runs in numeric order. ``on_done(run)`` is called as each notebook
    finishes (the chain's CLI records it in the run folder's ``run.json`` at once).
    """
    import papermill as pm

    log = log or (lambda message: print(message, flush=True))
    parameters = dict(parameters or {})
    out_dir = Path(out_dir)
    books = [Path(b) for b in (notebooks or list_notebooks())]
    inspected = {book: pm.inspect_notebook(str(book)) for book in books}
    declared = {book: set(specs) for book, specs in inspected.items()}
    unknown = sorted(set(parameters) - set().union(*declared.values()))
    if unknown:
        known = ", ".join(sorted(set().union(*declared.values())))
        raise ChainError(f"unknown parameter(s) {', '.join(unknown)}: no notebook of the chain declares them. "
                         f"Parameters they declare: {known}.")
    bad = check_chain_parameters(parameters, inspected)
    if bad:
        raise ChainError("bad parameter value(s), nothing was run:\n  " + "\n  ".join(bad))
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_lanes(books, default_lanes(parameters) if lanes is None else lanes)
    position = {book: i for i, book in enumerate(sorted(books, key=lambda b: b.name), 1)}
    total = len(books)
    stage_log = out_dir / "timings.jsonl"
    stage_log.unlink(missing_ok=True)
    share = lane_cpu_env(len(plan))
    if len(plan) > 1:
        log("lanes: " + " | ".join(" ".join(b.name[:2] for b in lane) for lane in plan)
            + (f" (each kernel: {', '.join(f'{k}={v}' for k, v in share.items())})" if share else ""))
    runs: list[NotebookRun] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def run_lane(lane: list[Path], name: str) -> None:
        for book in lane:
            if stop.is_set():
                return
            env = {**share, timing.LOG_ENV: str(stage_log.resolve()), timing.NOTEBOOK_ENV: book.name}
            try:
                done = _run_one(book, f"[{position[book]}/{total}]{name}", out_dir, parameters,
                                declared[book], kernel_name, html, log, env)
                runs.append(done)
                if on_done is not None:
                    on_done(done)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it
                failures.append(err)
                stop.set()
                return

    chain_start = time.perf_counter()
    if len(plan) == 1:
        run_lane(plan[0], "")
    else:
        threads = [threading.Thread(target=run_lane, args=(lane, f" lane {i}"), name=f"dgq-lane-{i}", daemon=True)
                   for i, lane in enumerate(plan, 1)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except KeyboardInterrupt:
            stop.set()
            raise
    if failures:
        raise failures[0]
    runs.sort(key=lambda r: r.notebook)
    write_timings(out_dir, parameters, runs, time.perf_counter() - chain_start, log,
                  lanes=[[b.name for b in lane] for lane in plan])
    return runs


def write_timings(out_dir: Path, parameters: dict, runs: list[NotebookRun], wall: float, log,
                  lanes: list[list[str]] | None = None) -> None:
    """``timings.json`` (per notebook, per stage, total), ``timings_stages.csv`` (:func:`dgq_utils.timing.summarise`
    of the stage log ``timings.jsonl``) in ``out_dir``, and the table printed through ``log``."""
    stages = timing.summarise(out_dir / "timings.jsonl")
    stages.to_csv(out_dir / "timings_stages.csv", index=False)
    nested = timing.summarise(out_dir / "timings.jsonl", all_depths=True)
    atomic_write_json(out_dir / "timings.json", {
        "parameters": parameters,
        "total_seconds": round(wall, 1),
        "seconds": {r.notebook: round(r.seconds, 1) for r in runs},
        "notebook_seconds_sum": round(sum(r.seconds for r in runs), 1),
        "lanes": lanes or [[r.notebook for r in runs]],
        # every stage, nested ones too (kmeans / weights / observe inside calibrate, bootstrap inside metrics)
        "stages": {nb: {row.stage: row.seconds for row in grp.itertuples()}
                   for nb, grp in nested.groupby("notebook")},
        "cpus": os.cpu_count(),
    })
    lines = [f"{'notebook':32s} {'seconds':>8s}  largest stages"]
    for r in runs:
        top = stages[stages.notebook == r.notebook].head(4)
        parts = ", ".join(f"{row.stage} {row.seconds:.0f} s" for row in top.itertuples())
        lines.append(f"{r.notebook:32s} {r.seconds:8.1f}  {parts}")
    if lanes and len(lanes) > 1:
        lines.append(f"{'sum over notebooks':32s} {sum(r.seconds for r in runs):8.1f}  ({len(lanes)} lanes: "
                     + " | ".join(" ".join(n[:2] for n in lane) for lane in lanes) + ")")
    lines.append(f"{'total (wall, with HTML export)':32s} {wall:8.1f}")
    log("\n".join(lines))


def _kernel_manager_class(env: dict[str, str], cwd: Path):
    """A jupyter_client kernel manager class whose kernels start in ``cwd`` with ``env`` added to the
    environment. Per notebook, instead of changing ``os.environ`` and the working directory of this process
    (papermill's ``cwd`` is an ``os.chdir``): two lanes start kernels at the same time."""
    from jupyter_client.manager import AsyncKernelManager

    class LaneKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            merged = dict(os.environ)
            merged.update(kw.pop("env", None) or {})
            merged.update(env)
            kw["cwd"] = str(cwd)
            return await super().start_kernel(env=merged, **kw)

    return LaneKernelManager


def _run_one(book: Path, counter: str, out_dir: Path, parameters: dict, declared: set, kernel_name, html: bool,
             log, env: dict[str, str] | None = None) -> NotebookRun:
    """Execute one notebook with the parameters it declares (its kernel with ``env`` added), export it, and
    time it."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    target = out_dir / book.name
    log(f"{counter} {book.name} ...")
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(book),
            str(target),
            parameters={k: v for k, v in parameters.items() if k in declared},
            kernel_name=kernel_name,
            progress_bar=False,
            kernel_manager_class=_kernel_manager_class(dict(env or {}), book.parent.resolve()),
        )
    except PapermillExecutionError as err:
        first_line = (err.source or "").strip().splitlines()[:1]
        raise ChainError(
            f"{book.name} failed in cell {err.cell_index} (execution count {err.exec_count}"
            f"{': ' + first_line[0] if first_line else ''}): {err.ename}: {err.evalue}\n"
            f"The executed notebook up to the failure is in {target}."
        ) from None
    seconds = time.perf_counter() - start
    page = export_html(target) if html else None
    log(f"{counter} {book.name} done in {seconds:.1f} s -> {target}")
    return NotebookRun(book.name, seconds, target, page)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a notebook parameter, e.g. -p device cuda (values parse as Python literals)")
    ap.add_argument("--quick", action="store_true", help="tiny N: the CI smoke run of the whole chain")
    ap.add_argument("--out", default=None, help="folder for executed notebooks and HTML (default: RUN/notebooks)")
    ap.add_argument("--only", nargs="*", help="run only these notebooks (names or numbers, e.g. 01 03)")
    ap.add_argument("--no-html", action="store_true", help="skip the HTML export")
    ap.add_argument("--lanes", type=int, default=None,
                    help="notebooks run side by side (default: 2 on a CPU run with <= 2 cores, else 1)")
    args = ap.parse_args(argv)

    params = dict(QUICK_PARAMETERS) if args.quick else {}
    params.update({k: _parse_value(v) for k, v in args.parameter})
    books = list_notebooks()
    if args.only:
        wanted = set(args.only)
        books = [b for b in books if b.stem in wanted or b.name in wanted or b.name[:2] in wanted]
        if not books:
            ap.error(f"--only {' '.join(args.only)} matches no notebook in {NOTEBOOK_DIR}")
    if args.lanes is not None and args.lanes < 1:
        ap.error(f"--lanes: got {args.lanes}; allowed: an integer >= 1 (1 runs the notebooks one after another)")
    # the run folder named by the settings (run.json in it); notebooks get it as save_to (dgq_utils.report.runs)
    run = run_folders.start_run(params, list_notebooks(), sys.argv[1:] if argv is None else argv, only=books)
    out = args.out or run.notebooks_dir
    start = time.perf_counter()
    try:
        runs = run_chain(run.parameters, out_dir=out, notebooks=books, html=not args.no_html, lanes=args.lanes,
                         on_done=run.note)
    except ChainError as err:
        run.finish(error=str(err))
        print(f"report: {err}", file=sys.stderr)
        return 1
    run.finish(runs)
    print(f"report: {len(runs)} notebooks in {time.perf_counter() - start:.0f} s wall "
          f"({sum(r.seconds for r in runs):.0f} s summed over notebooks); executed notebooks in {out}")
    print(compare_runs.summary(run.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
