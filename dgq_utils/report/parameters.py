"""Check the report chain's ``-p NAME VALUE`` parameters before the first notebook runs.

Each value is checked against the type of the default its notebooks' ``parameters`` cell declares (``64`` -> an
integer, ``7.5`` -> a number, ``False`` -> True/False, ``"cpu"`` -> a string, ``[1, 2]`` -> a list of the same
element type; ``None`` -> anything, except the names in :data:`NONE_DEFAULT_RULES`) and against a range where one
is obvious from the name (counts >= 1, ``seed`` >= 0, bit widths 2-16, ``device`` available on this machine).
Problems are returned as messages that name the parameter (``-p n_prompts: got str ('abc'); allowed: ...``), so
``-p n_prompts abc`` fails at once instead of as a ``TypeError`` deep inside notebook 04.
"""
from __future__ import annotations

import ast
from typing import Any

from dgq_utils.config import validation as V

#: counts where 0 is meaningful (everything else named ``n_*`` must be >= 1)
ZERO_ALLOWED = ("n_show",)
#: counts that are not named ``n_*``
COUNT_NAMES = ("batch_size", "num_inference_steps", "sweep_timesteps", "example_k", "threads")
#: list parameters: name -> the rule name their items are checked under
LIST_ITEMS = {"group_counts": "n_groups", "bits_grid": "bits"}
#: parameters whose declared default is ``None`` but whose type is known: name -> check
NONE_DEFAULT_RULES = {
    "threads": lambda v, name: V.check_count(v, name, 1, fix="CPU threads for torch, or None for the default."),
    # None: the model family's sampler (dgq_utils.report.sampling)
    "num_inference_steps": lambda v, name: V.check_count(
        v, name, 1, fix="sampling steps, e.g. 25, or None for the model family's (SDXL-Turbo: 4)."),
    "guidance_scale": lambda v, name: V.check_number(
        v, name, minimum=0.0, fix="e.g. 7.5 (0 = no classifier-free guidance), or None for the model family's."),
}


def _default(spec: dict) -> Any:
    try:
        return ast.literal_eval(spec.get("default", "None"))
    except (ValueError, SyntaxError):
        return spec.get("default")


def _check_scalar(name: str, flag: str, value: Any, default: Any, where: str) -> None:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise V.fail(flag, value, "True or False", f"{where}.")
        return
    if isinstance(default, int):
        if name == "seed":
            V.check_seed(value, flag)
        elif name.endswith("_bits") or name == "bits":
            V.check_count(value, flag, 2, 16, fix=f"a bit width, {where}.")
        elif name.startswith("n_") or name in COUNT_NAMES:
            V.check_count(value, flag, 0 if name in ZERO_ALLOWED else 1, fix=f"{where}.")
        else:
            V.check_count(value, flag, -(1 << 62), fix=f"{where}.")
        return
    if isinstance(default, float):
        V.check_number(value, flag, minimum=0.0 if name.endswith(("_scale", "_threshold")) else None,
                       fix=f"{where}.")
        return
    if isinstance(default, str):
        if not isinstance(value, str):
            raise V.fail(flag, value, "a string", f"{where}.")
        if name == "device":
            V.check_device(value, flag)


def check_chain_parameters(parameters: dict, inspected: dict) -> list[str]:
    """Problems with ``parameters`` given ``inspected`` (notebook -> papermill ``inspect_notebook`` result);
    one message per bad parameter, ``[]`` if all are fine."""
    problems = []
    for name, value in parameters.items():
        found = [(book, specs[name]) for book, specs in inspected.items() if name in specs]
        if not found:
            continue  # unknown names are reported by the chain itself
        book, spec = found[0]
        default = _default(spec)
        where = f"e.g. -p {name} {spec.get('default')!s}, the default in {getattr(book, 'name', book)}"
        flag = f"-p {name}"
        try:
            if default is None:
                rule = NONE_DEFAULT_RULES.get(name)
                if rule is not None and value is not None:
                    rule(value, flag)
            elif isinstance(default, (list, tuple)):
                if not isinstance(value, (list, tuple)) or (default and not value):
                    raise V.fail(flag, value, "a non-empty list", f"{where}.")
                for item in value:
                    _check_scalar(LIST_ITEMS.get(name, "item"), flag, item, default[0] if default else item, where)
            else:
                _check_scalar(name, flag, value, default, where)
        except V.InvalidArgumentError as err:
            problems.append(str(err))
    return problems
