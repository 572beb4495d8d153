"""JupyterLab as a person uses it: notebooks 01 and 03 opened in a real browser, run, and explored (slow).

A JupyterLab server starts headless on 127.0.0.1 (a free port, a random token, its own config / runtime / settings
folders) over a temporary copy of ``notebooks/``, so nothing in the repository is touched; the copies of 01 and 03
carry the chain's ``--quick`` parameters (plus ``threads = 1`` and a temporary ``save_to``), injected by papermill
without executing (``prepare_only``), so the kernel runs them on the CPU in well under a minute. Debian's Chromium
(``/usr/bin/chromium``), driven by Playwright, opens the notebook, runs it from the menu (Run > Run All Cells),
waits until every cell has run, then moves the explorer's widgets -- the layer dropdown and the "UNet call"
(timestep) slider -- and checks after each move that the explorer redrew: a screenshot of its output area
differs, and the PNG the kernel sent shows other data outside its title (a title naming the new layer alone does
not count; an explorer wired to draw a fixed layer fails this, checked by hand once).

Screenshots of each widget state are written to ``figures/lab_NN_*.png`` only when ``DGQ_LAB_SCREENSHOTS=1``, so
routine runs never rewrite the committed files:

    DGQ_LAB_SCREENSHOTS=1 .venv/bin/python -m pytest -q -m slow tests/test_lab_browser.py

Without Chromium the tests skip with the reason -- except in CI (``CI=true``), where a missing browser fails.
Playwright only drives the system browser (``executable_path``); it never downloads one.
"""
from __future__ import annotations

import base64
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
CHROMIUM = Path(os.environ.get("DGQ_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SAVE_SCREENSHOTS = os.environ.get("DGQ_LAB_SCREENSHOTS", "") == "1"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

SERVER_START_S = 120
RUN_ALL_S = 300  # two shared cores: the quick notebooks take ~15 s each alone, much longer under load
REDRAW_S = 120

#: the notebooks whose last cell is an explorer (plots.layer_explorer / plots.attention_explorer)
EXPLORERS = ["01_activation_outliers.ipynb", "03_attention_distributions.ipynb"]


def _unavailable(reason: str):
    """Outside CI a missing browser skips (with the reason); in CI it is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the browser test must run in CI; .ci/run installs it)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quick_parameters(book: Path, save_to: Path) -> dict:
    """The chain's ``--quick`` parameters plus one torch thread and a temporary output folder, restricted to
    those the notebook declares (as the chain does)."""
    import papermill as pm

    from dgq_utils.report.chain import QUICK_PARAMETERS

    wanted = dict(QUICK_PARAMETERS, threads=1, save_to=str(save_to))
    declared = set(pm.inspect_notebook(str(book)))
    return {k: v for k, v in wanted.items() if k in declared}


def _prepare_notebooks(dest: Path, save_to: Path) -> Path:
    """A copy of notebooks/ with the quick parameters injected (not executed) into the explorer notebooks."""
    import papermill as pm

    shutil.copytree(NB_DIR, dest)
    for name in EXPLORERS:
        pm.execute_notebook(str(NB_DIR / name), str(dest / name), parameters=_quick_parameters(NB_DIR / name, save_to),
                            prepare_only=True, progress_bar=False, log_output=False)
    return dest


def _api(url: str, token: str, path: str, method: str = "GET"):
    req = urllib.request.Request(f"{url}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:  # 127.0.0.1 only
        body = resp.read()
    return json.loads(body) if body else None


@dataclass
class Lab:
    url: str
    token: str
    context: object  # playwright BrowserContext
    log: Path

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else "(no server log)"


def _start_server(tmp: Path, root_dir: Path) -> tuple[subprocess.Popen, str, str, Path]:
    """JupyterLab on 127.0.0.1:<free port> with a token, no browser, and its own Jupyter folders under ``tmp``."""
    port, token = _free_port(), secrets.token_hex(16)
    dirs = {name: tmp / name for name in ("config", "data", "runtime", "lab-settings", "lab-workspaces", "ipython")}
    for d in dirs.values():
        d.mkdir(parents=True)
    # The news / update-check prompt would cover part of the page; notebooks render every cell in the DOM
    # (no windowing), so the explorer cell at the end can be found without scrolling.
    (dirs["config"] / "labconfig").mkdir()
    (dirs["config"] / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    tracker = dirs["lab-settings"] / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DGQ_OUTPUT_DIR=str(tmp / "outputs"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
               JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), JUPYTERLAB_SETTINGS_DIR=str(dirs["lab-settings"]),
               JUPYTERLAB_WORKSPACES_DIR=str(dirs["lab-workspaces"]), IPYTHONDIR=str(dirs["ipython"]))
    log = tmp / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root_dir}", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI runners: a local, token-guarded server
        cmd.append("--allow-root")
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=root_dir, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            _api(url, token, "/api/status")
            return proc, url, token, log
        except OSError:
            if time.monotonic() > deadline:
                proc.terminate()
                raise RuntimeError(f"JupyterLab did not answer on {url} within {SERVER_START_S} s:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}") from None
            time.sleep(0.5)


def _stop_server(proc: subprocess.Popen, url: str, token: str):
    try:  # shut the kernels down first, so none outlives the server
        for kernel in _api(url, token, "/api/kernels") or []:
            _api(url, token, f"/api/kernels/{kernel['id']}", method="DELETE")
    except OSError:
        pass
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A running JupyterLab over a quick-parameter copy of notebooks/, and a headless Chromium to drive it."""
    if not CHROMIUM.is_file():
        _unavailable(f"Chromium not found at {CHROMIUM} (Debian: apt-get install chromium chromium-driver; "
                     "or set DGQ_CHROMIUM to the browser's path)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]' (never `playwright install`: the test "
                    "drives the system Chromium)")
    tmp = tmp_path_factory.mktemp("lab")
    books = _prepare_notebooks(tmp / "notebooks", tmp / "out")
    proc, url, token, log = _start_server(tmp / "jupyter", books)
    pw = sync_playwright().start()
    try:
        context = pw.chromium.launch_persistent_context(
            str(tmp / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000}, device_scale_factor=1)
        try:
            yield Lab(url, token, context, log)
        finally:
            context.close()
    finally:
        pw.stop()
        _stop_server(proc, url, token)


# ---------------------------------------------------------------------------------------------------------------
# what a person does in the browser

_CELLS_JS = """() => {
  const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell')];
  const ind = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
  return {prompts: cells.map(c => (c.querySelector('.jp-InputArea-prompt') || {textContent: ''}).textContent.trim()),
          outputs: cells.map(c => (c.querySelector('.jp-OutputArea') || {innerText: ''}).innerText),
          status: ind ? ind.getAttribute('data-status') : null};
}"""


def _open_notebook(lab: Lab, name: str):
    page = lab.context.new_page()
    # one workspace per notebook, so JupyterLab does not restore the tabs of the previous test beside it
    page.goto(f"{lab.url}/lab/workspaces/{Path(name).stem}/tree/{name}?token={lab.token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-CodeCell", timeout=SERVER_START_S * 1000)
    # The toolbar reads "idle" before the session exists; Run All then would ask for a kernel. Wait until the
    # server has the notebook's kernel up and idle, and the page shows it.
    deadline = time.monotonic() + SERVER_START_S
    while not any(s["path"].endswith(name) and s["kernel"]["execution_state"] == "idle"
                  for s in _api(lab.url, lab.token, "/api/sessions")):
        if time.monotonic() > deadline:
            pytest.fail(f"{name}: no idle kernel within {SERVER_START_S} s\nserver log:\n{lab.log_tail()}")
        time.sleep(0.5)
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']",
                           timeout=SERVER_START_S * 1000)
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=SERVER_START_S * 1000)
    return page


def _run_all(page, lab: Lab, name: str):
    """Run > Run All Cells from the menu bar, then wait until no cell is queued or running."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.locator(".lm-Menu").get_by_role("menuitem", name="Run All Cells", exact=True).click()
    deadline, started, state = time.monotonic() + RUN_ALL_S, False, None
    while time.monotonic() < deadline:
        state = page.evaluate(_CELLS_JS)
        running = any(p.startswith("[*]") for p in state["prompts"])
        started = started or running or any(p[1:-2].isdigit() for p in state["prompts"])
        if started and not running and state["status"] == "idle":
            break
        time.sleep(1.0)
    else:
        page.screenshot(path=str(lab.log.with_name(f"{name}.timeout.png")))
        pytest.fail(f"{name}: Run All did not finish within {RUN_ALL_S} s; cell prompts {state and state['prompts']}, "
                    f"kernel {state and state['status']}; screenshot {lab.log.with_name(name + '.timeout.png')}"
                    f"\nserver log:\n{lab.log_tail()}")
    unrun = [i for i, p in enumerate(state["prompts"]) if not p[1:-2].isdigit()]
    if unrun:
        failed = unrun[0] - 1  # Run All stops at the failing cell; the ones after it stay unrun
        pytest.fail(f"{name}: code cell {failed} failed (prompts {state['prompts']}):\n"
                    f"{state['outputs'][failed][-3000:] if failed >= 0 else ''}")
    assert not any("Traceback" in out for out in state["outputs"]), \
        f"{name}: an error was printed: {next(o for o in state['outputs'] if 'Traceback' in o)[-3000:]}"


def _figure(box) -> str:
    """The image data of what the explorer's output area shows (the PNGs the kernel sent, as data URLs)."""
    return box.evaluate("b => [...b.querySelectorAll('.widget-output img')].map(i => i.src).join('|')")


def _decode(src: str) -> bytes:
    """The PNG bytes of the first image in ``src`` (as returned by :func:`_figure`)."""
    head, _, data = src.split("|")[0].partition(",")
    assert head == "data:image/png;base64", f"the explorer shows an image of type {head!r}, expected a PNG"
    return base64.b64decode(data)


def _wait_redraw(box, before: str, what: str) -> str:
    """Wait until the explorer shows a figure different from ``before`` and it has stopped changing."""
    deadline, last, stable = time.monotonic() + REDRAW_S, None, 0
    while time.monotonic() < deadline:
        now = _figure(box)
        if now and now != before:
            stable = stable + 1 if now == last else 0
            if stable >= 2:
                return now
        last = now
        time.sleep(0.5)
    text = box.locator(".widget-output").inner_text()
    pytest.fail(f"the explorer's figure did not change within {REDRAW_S} s after {what}; its output area says:\n"
                f"{text[-2000:]}")


def _pixels_changed(a: bytes, b: bytes) -> float:
    """Share of pixels that differ between two screenshots (placed top-left on a common white canvas when the
    figure changed size)."""
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16) for png in (a, b))
    h, w = max(x.shape[0], y.shape[0]), max(x.shape[1], y.shape[1])
    canvas = [np.full((h, w, 3), 255, dtype=np.int16) for _ in range(2)]
    canvas[0][: x.shape[0], : x.shape[1]] = x
    canvas[1][: y.shape[0], : y.shape[1]] = y
    return float((np.abs(canvas[0] - canvas[1]).max(axis=2) > 8).mean())


def _plot_content_changed(a: bytes, b: bytes, *, title_share: float = 0.15, scale: int = 4,
                          max_shift: float = 0.1, tol: float = 0.08) -> float:
    """Share of the plot that differs between two of the kernel's PNGs, ignoring the title and layout shifts.

    A figure whose title names the widget's value (layer, UNet call) changes even when the data drawn does not;
    a longer title also moves the axes (tight bounding box). So the top ``title_share`` of each image is cut,
    the rest is shrunk ``scale`` times (gray), and the smallest share of differing pixels over shifts of up to
    ``max_shift`` of the size is returned. An explorer that redraws the same data under a new title scores
    ~0 (0.0025 measured), a real redraw 0.3-0.6. (Brute-force shift search on small arrays instead of an image
    registration library: a few hundred numpy comparisons, no extra dependency.)
    """
    import numpy as np
    from PIL import Image

    imgs = []
    for png in (a, b):
        g = Image.open(io.BytesIO(png)).convert("L")
        g = g.crop((0, int(g.size[1] * title_share), g.size[0], g.size[1]))
        g = g.resize((max(g.size[0] // scale, 1), max(g.size[1] // scale, 1)), Image.BOX)
        imgs.append(np.asarray(g, dtype=np.float32) / 255.0)
    h, w = max(i.shape[0] for i in imgs), max(i.shape[1] for i in imgs)
    x, y = np.ones((h, w), np.float32), np.ones((h, w), np.float32)  # white canvas, images top-left
    x[: imgs[0].shape[0], : imgs[0].shape[1]] = imgs[0]
    y[: imgs[1].shape[0], : imgs[1].shape[1]] = imgs[1]
    sx, sy, best = int(w * max_shift), int(h * max_shift), 1.0
    for dx in range(-sx, sx + 1):
        for dy in range(-sy, sy + 1):
            xs = x[max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)]
            ys = y[max(-dy, 0): h + min(-dy, 0), max(-dx, 0): w + min(-dx, 0)]
            best = min(best, float((np.abs(xs - ys) > tol).mean()))
    return best


def _labelled(box, kind: str, label: str):
    """The ``.widget-<kind>`` control of ``box`` whose label reads ``label``."""
    page = box.page
    return box.locator(f".widget-{kind}", has=page.locator(".widget-label", has_text=label)).first


class _Screens:
    """Screenshots of one notebook's explorer: its figure area (compared between states; kept beside the server
    log for a failure's post-mortem) and, when asked for, the JupyterLab window scrolled to the explorer cell
    (saved to figures/: what a reader of the report sees)."""

    def __init__(self, page, cell, box, prefix: str, scratch: Path):
        self.page, self.cell, self.box, self.prefix, self.scratch, self.n = page, cell, box, prefix, scratch, 0

    def take(self, state: str, src: str) -> bytes:
        self.n += 1
        (self.scratch / f"{self.prefix}_{self.n}_{state}.plot.png").write_bytes(_decode(src))
        figure = self.box.locator(".widget-output").screenshot(
            path=str(self.scratch / f"{self.prefix}_{self.n}_{state}.figure.png"))
        if SAVE_SCREENSHOTS:
            self.cell.evaluate("c => c.scrollIntoView({block: 'start'})")
            self.page.mouse.move(0, 0)  # no hover highlight in the picture
            self.page.screenshot(path=str(ROOT / "figures" / f"{self.prefix}_{self.n}_{state}.png"))
        return figure


def _assert_redrawn(name: str, change: str, fig_before: str, fig_after: str, shot_before: bytes, shot_after: bytes):
    """After a widget move: the browser shows a visibly different output area, and the plot in it shows other
    data (not only a new title)."""
    seen = _pixels_changed(shot_before, shot_after)
    plotted = _plot_content_changed(_decode(fig_before), _decode(fig_after))
    print(f"{name}: {change}: {seen:.1%} of the output area's pixels and {plotted:.1%} of the plot changed")
    assert seen > 0.01, f"{name}: {change} changed only {seen:.2%} of the output area's pixels"
    assert plotted > 0.02, (f"{name}: {change} changed the plot by only {plotted:.2%} outside its title: the "
                            "explorer redrew the same data")


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPLORERS)
def test_explorer_widgets_redraw_the_figure_in_jupyterlab(lab, name):
    page = _open_notebook(lab, name)
    try:
        _run_all(page, lab, name)
        cell = page.locator(".jp-Notebook .jp-CodeCell").last
        box = cell.locator(".widget-vbox").first
        box.wait_for(timeout=REDRAW_S * 1000)
        box.locator(".widget-output img").first.wait_for(timeout=REDRAW_S * 1000)
        screens = _Screens(page, cell, box, f"lab_{name[:2]}", lab.log.parent)
        fig = _wait_redraw(box, "", "Run All")
        shot = screens.take("default", fig)

        # a different layer (half the list away: another block of the UNet)
        select = _labelled(box, "dropdown", "layer").locator("select")
        options = select.evaluate("s => [...s.options].map(o => o.textContent)")
        current = select.evaluate("s => s.selectedIndex")
        assert len(options) > 1, f"{name}: the layer dropdown offers {options}"
        choice = options[(current + max(len(options) // 2, 1)) % len(options)]
        select.select_option(label=choice)
        fig_layer = _wait_redraw(box, fig, f"picking layer {choice!r}")
        shot_layer = screens.take("layer", fig_layer)
        _assert_redrawn(name, f"layer {options[current]!r} -> {choice!r}", fig, fig_layer, shot, shot_layer)

        # one sampling step earlier (or later at the first step), with the slider's keyboard control
        slider = _labelled(box, "slider", "UNet call")
        handle = slider.locator(".noUi-handle").first
        readout = slider.locator(".widget-readout")
        step_before = int(readout.inner_text())
        lowest = float(handle.get_attribute("aria-valuemin") or 0)
        handle.focus()
        page.keyboard.press("ArrowLeft" if step_before > lowest else "ArrowRight")
        fig_step = _wait_redraw(box, fig_layer, f"moving the UNet-call slider from {step_before}")
        step_after = int(readout.inner_text())
        assert step_after != step_before, f"{name}: the slider still reads {step_after}"
        shot_step = screens.take("timestep", fig_step)
        _assert_redrawn(name, f"UNet call {step_before} -> {step_after}", fig_layer, fig_step, shot_layer, shot_step)
    finally:
        page.close()
        for session in _api(lab.url, lab.token, "/api/sessions"):  # free the two cores for the next notebook
            if session["path"].endswith(name):
                _api(lab.url, lab.token, f"/api/sessions/{session['id']}", method="DELETE")


def test_plot_comparison_sees_data_not_titles():
    """Fast check of the comparison the browser test relies on, on figures drawn here: the same data under a
    longer title (which also moves the axes) counts as unchanged, other data as changed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    def png(values, title):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(values)
        fig.suptitle(title)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")  # what the inline backend does
        plt.close(fig)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(size=200)
    title = "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2 — call {} (t = 501), all prompts"
    same = png(a, title.format(2))
    retitled = png(a, "down_" + title.format(12))  # wider than the axes: the tight box grows, the axes move
    assert Image.open(io.BytesIO(same)).size != Image.open(io.BytesIO(retitled)).size
    assert _plot_content_changed(same, retitled) < 0.02
    assert _plot_content_changed(same, png(b, title.format(2))) > 0.1
