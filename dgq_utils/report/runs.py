"""Run folders: every run of the report writes into a folder named by its settings, with a ``run.json`` record.

A full run of the chain (``python -m dgq_utils.report``, no ``--quick``, a real model) writes into
``<outputs>/runs/<model>-n<prompts>-c<calibration>-<device>-<hash>/``::

    figures/  results/     what the notebooks save (the same names as the committed figures/ and results/)
    notebooks/             executed notebooks, their HTML exports and the stage timings
    run.json               parameters, command, machine, git commit, dates, notebooks run, complete or not

``run.json``'s ``settings`` name the model's family and the sampler the notebooks use (``settings["sampler"]``:
steps and guidance after the family's defaults and quick mode's cap, :mod:`dgq_utils.report.sampling`); in
``resolved`` a ``None`` step count or guidance is replaced by the family's value.

``<hash>`` (:func:`dgq_utils.report.folders.short_hash`) covers every parameter of every notebook of the chain as
it will run (the notebooks' declared defaults with the ``-p`` values applied), except those that only say where
files go or how many threads compute them (:data:`NOT_IN_NAME`); so two runs share a folder exactly when they
compute the same thing, and ``--only 05`` refreshes notebook 05 of the same run. Quick runs keep
``<outputs>/quick/``, the tiny pipeline ``<outputs>/tiny/``; an explicit ``-p save_to DIR`` is the run folder.

The repository's own ``figures/`` and ``results/`` are never a run's default destination: they hold one declared
run (``results/RUN.json``), replaced only by :mod:`dgq_utils.report.publish`.
"""
from __future__ import annotations

import ast
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

from dgq_utils.atomic import atomic_write_json
from dgq_utils.config.validation import InvalidArgumentError
from dgq_utils.model.loading import FAMILY_SAMPLER_DEFAULTS
from dgq_utils.report.context import model_family_of
from dgq_utils.report.folders import NOT_IN_NAME, ROOT, default_run_folder
from dgq_utils.report.sampling import report_sampling

__all__ = [
    "COMMITTED_FILE",
    "RUN_FILE",
    "RunRecord",
    "describe",
    "git_state",
    "machine_info",
    "read_run",
    "start_run",
]

#: the record of a run inside its folder (and, for the committed set, ``results/RUN.json``)
RUN_FILE = "run.json"
#: the committed set's record, in the repository's ``results/``
COMMITTED_FILE = "RUN.json"
RUN_FORMAT = "dgq-run/1"


# ==============================================================================================================
# the record
# ==============================================================================================================
def git_state(root: Path = ROOT) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout at ``root`` (tracked files only)."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=20, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20, check=True).stdout
        return {"commit": commit or None, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _gpu_names() -> list[str]:
    """GPU names from ``nvidia-smi`` (no CUDA context in this process); ``[]`` without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine_info(device: Any = "cpu") -> dict:
    """CPU count, platform, Python and torch versions and the name of ``device`` (GPUs: ``nvidia-smi``'s name and
    driver; the chain's own process never imports torch or opens a CUDA context for this)."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch_version, "device": str(device)}
    if str(device).startswith("cuda"):
        gpus = _gpu_names()
        info["device_name"] = gpus[0].split(",")[0].strip() if gpus else "cuda (nvidia-smi not found)"
        info["gpus"] = gpus
    else:
        info["device_name"] = platform.processor() or platform.machine() or "cpu"
    return info


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _resolve(parameters: Mapping[str, Any], inspected: Mapping[Any, Mapping[str, Any]]) -> dict:
    """Every notebook's parameters as they will run: ``{notebook name: {parameter: value}}``."""
    out = {}
    for book, specs in inspected.items():
        values = {}
        for name, spec in specs.items():
            if name in parameters:
                values[name] = parameters[name]
            else:
                try:
                    values[name] = ast.literal_eval(spec.get("default", "None"))
                except (ValueError, SyntaxError):
                    values[name] = spec.get("default")
        out[getattr(book, "name", str(book))] = values
    return out


#: notebook parameters whose ``None`` default means "the model family's value" (:mod:`dgq_utils.report.sampling`)
FAMILY_PARAMETERS = ("num_inference_steps", "guidance_scale")


def _with_family_sampler(resolved: dict, family: str | None) -> dict:
    """``resolved`` with the ``None`` of :data:`FAMILY_PARAMETERS` replaced by ``family``'s values (what the notebooks
    run with; quick mode's step cap is not applied here: ``settings["sampler"]`` records it)."""
    if family is None:
        return resolved
    defaults = FAMILY_SAMPLER_DEFAULTS[family]
    return {book: {k: (defaults[k] if k in FAMILY_PARAMETERS and v is None else v) for k, v in values.items()}
            for book, values in resolved.items()}


def _family(model_id: Any) -> tuple[str | None, str | None]:
    """``(family, None)`` of the run's model, or ``(None, why)`` when the chain cannot tell (the notebooks then
    fail on loading it, with the loader's message)."""
    try:
        return model_family_of(model_id), None
    except (OSError, ValueError) as err:  # FileNotFoundError, ModelNotAvailableOffline, UnsupportedPipeline
        return None, f"{type(err).__name__}: {err}"


def _shared(resolved: Mapping[str, Mapping[str, Any]], name: str, default: Any = None) -> Any:
    """The value of ``name`` in the last notebook that declares it (04-06 agree on the shared ones)."""
    found = [v[name] for v in resolved.values() if name in v]
    return found[-1] if found else default


_NOTE_LOCK = threading.Lock()


@dataclass
class RunRecord:
    """One run of the chain: its folder, the parameters the chain gets (``save_to`` set) and its ``run.json``."""

    folder: Path
    parameters: dict
    record: dict = field(default_factory=dict)
    previous: dict | None = None
    #: notebooks recorded by :meth:`note` during this call
    noted: list = field(default_factory=list)

    @property
    def notebooks_dir(self) -> Path:
        return self.folder / "notebooks"

    @property
    def figures(self) -> Path:
        return self.folder / "figures"

    @property
    def results(self) -> Path:
        return self.folder / "results"

    def write(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(self.folder / RUN_FILE, self.record)

    def finish(self, runs: Sequence[Any] = (), *, error: str | None = None) -> None:
        """Record the notebooks that ran (``NotebookRun``-like: ``.notebook``, ``.seconds``) and whether the chain
        completed. A chain that stopped before any notebook ran (bad parameters) leaves the folder as it was: the
        earlier record back, or no folder."""
        if error is not None and not runs and not self.noted:
            if self.previous is not None:
                atomic_write_json(self.folder / RUN_FILE, self.previous)
                return
            (self.folder / RUN_FILE).unlink(missing_ok=True)
            for p in (self.notebooks_dir, self.folder):
                try:
                    p.rmdir()
                except OSError:
                    pass
            return
        done = dict(self.record.get("notebooks_seconds", {}))
        done.update({r.notebook: round(float(r.seconds), 1) for r in runs})
        chain = self.record.get("chain_notebooks")
        # complete: this call raised nothing and, with earlier --only calls into the same folder, every notebook
        # of the chain has run (a run record names them in "chain_notebooks")
        covered = chain is None or set(chain) <= set(done)
        self.record.update({"finished": _now(), "complete": error is None and covered, "error": error,
                            "notebooks_seconds": done})
        self.write()

    def note(self, run: Any) -> None:
        """Record one finished notebook at once (``NotebookRun``-like), so a chain killed later (a device call's
        time limit, Ctrl-C) still says what it finished and a later ``--only`` call into the folder adds to it.
        Safe to call from the chain's lane threads."""
        with _NOTE_LOCK:
            done = dict(self.record.get("notebooks_seconds", {}))
            done[run.notebook] = round(float(run.seconds), 1)
            self.record["notebooks_seconds"] = done
            self.noted.append(run.notebook)
            self.write()


def start_run(parameters: Mapping[str, Any], notebooks: Sequence[Path], argv: Sequence[str] | None = None, *,
              only: Sequence[Path] | None = None) -> RunRecord:
    """Name the run folder of a chain with ``parameters`` (``-p`` values) over ``notebooks`` (all numbered
    notebooks: their declared defaults make the settings), write its ``run.json`` and return the record, whose
    ``parameters`` carry ``save_to`` (the folder) for every notebook. ``only``: the notebooks this call runs."""
    import papermill as pm

    inspected = {Path(b): pm.inspect_notebook(str(b)) for b in notebooks}
    declared = _resolve(parameters, inspected)
    family, family_error = _family(_shared(declared, "model_id"))
    resolved = _with_family_sampler(declared, family)
    quick = bool(parameters.get("quick", False))
    sampler = None
    if family is not None:
        try:  # what the notebooks will sample with (a bad -p value is reported by the chain's parameter check)
            sampler = report_sampling(family, _shared(declared, "num_inference_steps"),
                                      _shared(declared, "guidance_scale"), quick=quick).as_record()
        except InvalidArgumentError:
            sampler = None
    device = _shared(resolved, "device", "cpu")
    save_to = parameters.get("save_to")
    if save_to is not None:
        folder = Path(str(save_to)).expanduser()
    else:
        keyed = {nb: {k: v for k, v in values.items() if k not in NOT_IN_NAME} for nb, values in resolved.items()}
        folder = default_run_folder({"model_id": _shared(resolved, "model_id"), "device": device,
                                     "n_prompts": _shared(resolved, "n_prompts"),
                                     "n_calibration": _shared(resolved, "n_calibration"), "notebooks": keyed},
                                    quick=quick)
    folder = folder.resolve()
    previous_file = folder / RUN_FILE
    previous = json.loads(previous_file.read_text(encoding="utf-8")) if previous_file.is_file() else None
    record = {
        "format": RUN_FORMAT,
        "name": folder.name,
        "folder": str(folder),
        "settings": {"model_id": _shared(resolved, "model_id"), "device": device, "quick": quick,
                     "n_prompts": _shared(resolved, "n_prompts"), "n_calibration": _shared(resolved, "n_calibration"),
                     "seed": _shared(resolved, "seed"), "family": family, "sampler": sampler,
                     **({"family_error": family_error} if family_error else {})},
        "parameters": dict(parameters),
        "resolved": resolved,
        "command": "python -m dgq_utils.report" + ("" if not argv else " " + shlex.join(list(argv))),
        "notebooks": [Path(b).name for b in (only if only is not None else notebooks)],
        "chain_notebooks": [Path(b).name for b in notebooks],
        "machine": machine_info(device),
        "git": git_state(),
        "started": _now(),
        "finished": None,
        "complete": False,
        # a rerun of some notebooks (--only) into the same folder keeps what earlier calls recorded
        "notebooks_seconds": dict((previous or {}).get("notebooks_seconds", {})),
    }
    run = RunRecord(folder, {**dict(parameters), "save_to": str(folder)}, record, previous)
    run.write()
    return run


def read_run(folder: str | os.PathLike) -> dict | None:
    """The ``run.json`` of a run folder (or the ``RUN.json`` of a results folder), ``None`` if there is none."""
    folder = Path(folder)
    for p in (folder / RUN_FILE, folder / COMMITTED_FILE, folder / "results" / COMMITTED_FILE):
        if p.is_file():
            try:
                return json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
    return None


def describe(record: Mapping[str, Any] | None) -> str:
    """One line: model, prompts, calibration prompts, device (name), date and commit of a run record."""
    if not record:
        return "(no run record)"
    s = record.get("settings", {})
    m = record.get("machine", {})
    git = record.get("git") or {}
    commit = (str(git["commit"])[:10] + (" + local changes" if git.get("dirty") else "") if git.get("commit")
              else "not recorded" + (f", results committed in {str(git['committed_in'])[:10]}"
                                     if git.get("committed_in") else ""))
    model = "embedded model" if s.get("model_id") is None else str(s.get("model_id"))
    sizes = ("quick (tiny N)" if s.get("quick") else
             f"{s.get('n_prompts')} prompts, {s.get('n_calibration')} calibration prompts")
    return (f"{model}, {sizes}, {s.get('device')} ({m.get('device_name', '?')}, {m.get('cpus', '?')} CPUs, "
            f"torch {m.get('torch', '?')}), {(record.get('finished') or record.get('started') or '?')[:10]}, "
            f"commit {commit}")


if __name__ == "__main__":  # pragma: no cover - convenience: show a run record
    print(describe(read_run(sys.argv[1] if len(sys.argv) > 1 else ROOT / "results")))
