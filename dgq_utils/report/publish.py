"""Publish one run as the committed report: copy its figures and tables into the repository, record which run.

    python -m dgq_utils.report.publish outputs/runs/embedded-n2000-c64-cuda-<hash>      # then review and commit
    python -m dgq_utils.report.publish RUN_FOLDER --dry-run                              # only say what would change

The only way a run replaces the repository's ``figures/`` and ``results/`` (``make report`` writes into its own run
folder). It copies every file of the run's ``figures/`` and ``results/`` over the committed ones and writes
``results/RUN.json``: the run's ``run.json`` plus when it was published and which files came from it. Committed
notebook outputs (``NN_*``) the run did not produce are listed (they would describe another run); ``--prune``
deletes them. A run that did not complete every notebook of the chain, a quick run or a tiny-pipeline run is
refused unless ``--force``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path

from dgq_utils.atomic import atomic_write_json
from dgq_utils.report.folders import ROOT
from dgq_utils.report.runs import COMMITTED_FILE, RUN_FILE, describe, read_run

__all__ = ["PublishError", "publish", "refusals"]

#: files of the committed folders that a notebook of the chain writes (``01_...`` to ``99_...``)
NOTEBOOK_OUTPUT = re.compile(r"^\d\d_")
#: the notebooks a complete run has executed
CHAIN_NOTEBOOKS = ("01", "02", "03", "04", "05", "06", "07")


class PublishError(RuntimeError):
    """The run cannot be published (the message says why and what to do)."""


def refusals(record: dict | None) -> list[str]:
    """Why a run record is not fit to be the committed run (``[]``: it is)."""
    if record is None:
        return [f"no {RUN_FILE}: not a run folder of python -m dgq_utils.report"]
    problems = []
    settings = record.get("settings", {})
    if settings.get("quick"):
        problems.append("a quick run (tiny N)")
    if str(settings.get("model_id")) == "tiny":
        problems.append("a run of the tiny random pipeline")
    done = {str(name)[:2] for name in record.get("notebooks_seconds", {})}
    missing = [nb for nb in CHAIN_NOTEBOOKS if nb not in done]
    if missing:
        problems.append(f"notebooks {', '.join(missing)} have not completed in this run folder")
    if record.get("error"):
        problems.append(f"its last chain call failed: {str(record['error']).splitlines()[0]}")
    return problems


def publish(run_folder: str | os.PathLike, *, into: str | os.PathLike = ROOT, force: bool = False,
            prune: bool = False, dry_run: bool = False, log=print) -> dict:
    """Copy ``run_folder``'s figures and results into ``into`` (the repository root) and write
    ``results/RUN.json``. Returns the written record. Raises :class:`PublishError` for an unfit run (see
    :func:`refusals`) unless ``force``."""
    run_folder, into = Path(run_folder).resolve(), Path(into).resolve()
    if run_folder == into:
        raise PublishError(f"{run_folder} is the repository itself: nothing to publish")
    record = read_run(run_folder) if (run_folder / RUN_FILE).is_file() else None
    problems = refusals(record)
    if problems and not force:
        raise PublishError(f"refusing to publish {run_folder}: " + "; ".join(problems) +
                           ". Run the full chain into it (python -m dgq_utils.report with the same -p values), "
                           "or pass --force.")
    copied, stale = [], []
    for sub in ("figures", "results"):
        src, dst = run_folder / sub, into / sub
        produced = sorted(p for p in src.iterdir() if p.is_file()) if src.is_dir() else []
        names = {p.name for p in produced}
        for p in produced:
            copied.append(f"{sub}/{p.name}")
            if not dry_run:
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dst / p.name)
        if dst.is_dir():
            stale += [f"{sub}/{p.name}" for p in sorted(dst.iterdir())
                      if p.is_file() and NOTEBOOK_OUTPUT.match(p.name) and p.name not in names]
    if prune and not dry_run:
        for rel in stale:
            (into / rel).unlink()
    published = dict(record or {})
    published.update({"published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "published_from": str(run_folder), "files": copied,
                      "forced": bool(problems) or None})
    verb = "would copy" if dry_run else "copied"
    log(f"publish: {verb} {len(copied)} files from {run_folder} into {into}/figures and {into}/results")
    log(f"publish: the committed run is now: {describe(published)}")
    if stale:
        log(f"publish: {len(stale)} committed notebook outputs this run did not produce "
            f"({'deleted' if prune and not dry_run else 'kept; --prune deletes them'}): {', '.join(stale)}")
    if not dry_run:
        atomic_write_json(into / "results" / COMMITTED_FILE, published)
        log(f"publish: wrote {into / 'results' / COMMITTED_FILE}; review with `git status figures results`, "
            "update the README's numbers (tests/test_readme_numbers.py checks them) and commit")
    return published


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_folder", help="the run folder to publish (outputs/runs/...)")
    ap.add_argument("--into", default=str(ROOT), help="the repository root (default: this checkout)")
    ap.add_argument("--force", action="store_true", help="publish an incomplete, quick or tiny run anyway")
    ap.add_argument("--prune", action="store_true", help="delete committed notebook outputs the run did not produce")
    ap.add_argument("--dry-run", action="store_true", help="only say what would be copied")
    args = ap.parse_args(argv)
    try:
        publish(args.run_folder, into=args.into, force=args.force, prune=args.prune, dry_run=args.dry_run)
    except PublishError as err:
        print(f"publish: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
