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

papermill does the execution and parameter injection and nbconvert the HTML export; this module only orders
the notebooks, times them and turns papermill's exception into a readable message.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dgq_utils import paths, timing
from dgq_utils.atomic import atomic_write_json
from dgq_utils.report.parameters import check_chain_parameters

ROOT = paths.REPO_ROOT
NOTEBOOK_DIR = ROOT / "notebooks"
DEFAULT_OUT = paths.output_dir() / "report"

#: parameters that --quick sets (every notebook reads the ones it declares)
QUICK_PARAMETERS = {"quick": True}


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


def run_chain(
    parameters: dict | None = None,
    *,
    out_dir: Path | str = DEFAULT_OUT,
    notebooks: list[Path] | None = None,
    html: bool = True,
    kernel_name: str | None = None,
    log=None,
) -> list[NotebookRun]:
    """Execute ``notebooks`` (default: all numbered notebooks) in order with ``parameters``.

    Raises :class:`ChainError` naming the notebook and cell at the first failure; the partially executed
    notebook is kept in ``out_dir`` for inspection.
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
    runs: list[NotebookRun] = []
    total = len(books)
    stage_log = out_dir / "timings.jsonl"
    stage_log.unlink(missing_ok=True)
    saved_env = {k: os.environ.get(k) for k in (timing.LOG_ENV, timing.NOTEBOOK_ENV)}
    os.environ[timing.LOG_ENV] = str(stage_log.resolve())
    chain_start = time.perf_counter()
    try:
        for i, book in enumerate(books, 1):
            os.environ[timing.NOTEBOOK_ENV] = book.name
            runs.append(_run_one(book, f"[{i}/{total}]", out_dir, parameters, declared[book], kernel_name, html, log))
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    write_timings(out_dir, parameters, runs, time.perf_counter() - chain_start, log)
    return runs


def write_timings(out_dir: Path, parameters: dict, runs: list[NotebookRun], wall: float, log) -> None:
    """``timings.json`` (per notebook, per stage, total), ``timings_stages.csv`` (:func:`dgq_utils.timing.summarise`
    of the stage log ``timings.jsonl``) in ``out_dir``, and the table printed through ``log``."""
    stages = timing.summarise(out_dir / "timings.jsonl")
    stages.to_csv(out_dir / "timings_stages.csv", index=False)
    nested = timing.summarise(out_dir / "timings.jsonl", all_depths=True)
    atomic_write_json(out_dir / "timings.json", {
        "parameters": parameters,
        "total_seconds": round(wall, 1),
        "seconds": {r.notebook: round(r.seconds, 1) for r in runs},
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
    lines.append(f"{'total (wall, with HTML export)':32s} {wall:8.1f}")
    log("\n".join(lines))


def _run_one(book: Path, counter: str, out_dir: Path, parameters: dict, declared: set, kernel_name, html: bool,
             log) -> NotebookRun:
    """Execute one notebook with the parameters it declares, export it, and time it."""
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
            cwd=str(book.parent),
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
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="folder for executed notebooks and HTML")
    ap.add_argument("--only", nargs="*", help="run only these notebooks (names or numbers, e.g. 01 03)")
    ap.add_argument("--no-html", action="store_true", help="skip the HTML export")
    args = ap.parse_args(argv)

    params = dict(QUICK_PARAMETERS) if args.quick else {}
    params.update({k: _parse_value(v) for k, v in args.parameter})
    books = list_notebooks()
    if args.only:
        wanted = set(args.only)
        books = [b for b in books if b.stem in wanted or b.name in wanted or b.name[:2] in wanted]
        if not books:
            ap.error(f"--only {' '.join(args.only)} matches no notebook in {NOTEBOOK_DIR}")
    try:
        runs = run_chain(params, out_dir=args.out, notebooks=books, html=not args.no_html)
    except ChainError as err:
        print(f"report: {err}", file=sys.stderr)
        return 1
    print(f"report: {len(runs)} notebooks in {sum(r.seconds for r in runs):.0f} s; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
