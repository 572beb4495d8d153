"""The package's shape, checked from the source (stdlib ``ast``, nothing imported): no import cycle, lower floors
never import higher ones, no imports hidden inside functions to dodge a cycle, no private names imported across
modules. The graph is built by ``scripts/module_graph.py`` (run it to see the subpackage graph).

Floors, lowest first (an import may go down or sideways, never up)::

    paths, atomic, keys  <  core  <  config, kernels  <  model  <  calibrate  <  quantize  <  generate  <  evaluate
        <  world, testing, protocol  <  report

``world`` (the embedded model's synthetic world) and ``testing`` (tiny pipelines for tests and demos) are
applications of the engine (``config`` ... ``evaluate``): they import it, it never imports them (the world plugs
into the engine through its registries, e.g. the feature extractor). ``protocol`` (the paper's protocols as a
command) is another application: it imports the engine, never world or testing (``testing`` may launch it).
``report`` sits on top: the notebooks run the
engine on the embedded world, or on the tiny pipeline in smoke runs.

The allow-lists below (violations owned by a change in progress) are empty; an entry that is no longer needed
fails the test, so they only shrink.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("module_graph", ROOT / "scripts" / "module_graph.py")
module_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(module_graph)

FLOORS = {
    "(root)": 0, "paths": 0, "atomic": 0, "keys": 0, "timing": 0,
    "core": 1,
    "config": 2, "kernels": 2,
    "model": 3,
    "calibrate": 4,
    "quantize": 5,
    "generate": 6,
    "evaluate": 7,
    # applications of the engine: they may import it, the engine never imports them
    "world": 8, "testing": 8, "protocol": 8,
    # the report runs the engine on the embedded world (and on the tiny test pipeline): the top floor
    "report": 9,
}
#: the engine: no module of these floors imports world / testing (checked by the floors, and once more by name)
ENGINE = {stage for stage, floor in FLOORS.items() if floor <= FLOORS["evaluate"]}
OUTSIDE = ("world", "testing")

# ---- known violations, owned by the public-API change (evaluate/, report/, world coupling, caches) ----------
# (source module, target module): an import made inside a function
#: package modules that need an optional third-party package and are therefore imported where they are used, with a
#: fallback when the package is missing (not a cycle dodge; these stay)
OPTIONAL_BACKENDS = {
    ("dgq_utils.kernels.quant_attention", "dgq_utils.kernels.triton_attention"),  # needs Triton (absent on some CPUs)
}

KNOWN_FUNCTION_LEVEL: set[tuple[str, str]] = set()
# (source module, target module): an engine module importing world / testing
KNOWN_OUTSIDE_IMPORTS: set[tuple[str, str]] = set()
# (source module, target module, name): a private name imported from another module
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()


@pytest.fixture(scope="module")
def graph():
    return module_graph.module_graph(ROOT)


def _stage(module: str) -> str:
    return module_graph.stage_of(module)


def test_every_module_parses_and_every_stage_has_a_floor(graph):
    files, records = graph
    assert "dgq_utils.calibrate.trace" in files and records
    unknown = {_stage(m) for m in files} - set(FLOORS)
    assert not unknown, f"new subpackage(s) {sorted(unknown)}: give them a floor in FLOORS (and the docstring)"
    missing = {r.target for r in records if r.target not in files}
    assert not missing, f"imports of modules that do not exist: {sorted(missing)}"


def test_no_import_cycle(graph):
    files, records = graph
    edges: dict[str, set[str]] = {}
    for r in records:  # module level and inside functions: a hidden import still closes a cycle at run time
        if r.source != r.target and r.target != r.source.rsplit(".", 1)[0]:
            edges.setdefault(r.source, set()).add(r.target)
    assert module_graph.cycles(edges) == []
    stages: dict[str, set[str]] = {}
    for a, bs in edges.items():
        for b in bs:
            if _stage(a) != _stage(b):
                stages.setdefault(_stage(a), set()).add(_stage(b))
    assert module_graph.cycles(stages) == [], "the subpackages import each other in a cycle"


def test_lower_floors_never_import_higher_ones(graph):
    files, records = graph
    bad = sorted({(r.source, r.target) for r in records
                  if _stage(r.source) in FLOORS and _stage(r.target) in FLOORS
                  and FLOORS[_stage(r.target)] > FLOORS[_stage(r.source)]})
    assert not bad, "imports that go up a floor:\n" + "\n".join(f"  {a} -> {b}" for a, b in bad)


def test_the_engine_never_imports_world_or_testing(graph):
    files, records = graph
    found = {(r.source, r.target) for r in records if _stage(r.source) in ENGINE and _stage(r.target) in OUTSIDE}
    new = sorted(found - KNOWN_OUTSIDE_IMPORTS)
    assert not new, "engine modules importing world/testing:\n" + "\n".join(f"  {a} -> {b}" for a, b in new)
    stale = sorted(KNOWN_OUTSIDE_IMPORTS - found)
    assert not stale, f"fixed, remove from KNOWN_OUTSIDE_IMPORTS: {stale}"
    for r in records:  # testing is for tests: world does not need it either
        assert not (_stage(r.source) == "world" and _stage(r.target) == "testing"), r
        # the protocol command runs real models: neither the embedded world nor the test stand-ins
        assert not (_stage(r.source) == "protocol" and _stage(r.target) in OUTSIDE), r


def test_no_package_imports_inside_functions(graph):
    """Imports of ``dgq_utils`` modules sit at module level (a function-level import hides a cycle or a floor
    violation); optional heavy third-party imports inside functions are fine and not checked here."""
    files, records = graph
    found = {(r.source, r.target) for r in records if r.in_function}
    found -= OPTIONAL_BACKENDS
    new = sorted(found - KNOWN_FUNCTION_LEVEL)
    assert not new, "dgq_utils imports inside functions:\n" + "\n".join(
        f"  {r}" for r in records if r.in_function and (r.source, r.target) in set(new))
    stale = sorted(KNOWN_FUNCTION_LEVEL - found)
    assert not stale, f"fixed, remove from KNOWN_FUNCTION_LEVEL: {stale}"


def test_no_private_names_imported_across_modules(graph):
    files, records = graph
    found = {(r.source, r.target, n) for r in records if r.source != r.target
             for n in r.names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))}
    new = sorted(found - KNOWN_PRIVATE_IMPORTS)
    assert not new, "private names imported from another module (make them public or keep them local):\n" + \
        "\n".join(f"  {a} imports {n} from {b}" for a, b, n in new)
    assert not (KNOWN_PRIVATE_IMPORTS - found), "fixed, remove from KNOWN_PRIVATE_IMPORTS"


def test_the_graph_script_runs(capsys):
    assert module_graph.main([]) == 0
    out = capsys.readouterr().out
    assert "calibrate" in out and "cycles: none" in out
