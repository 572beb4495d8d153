"""A non-editable install (``pip install .``, the wheel) finds the embedded model from any working directory.

The wheel ships ``data/embedded`` as ``dgq_utils/data/embedded`` (``setup.py``); :mod:`dgq_utils.paths` looks
there first. The slow test builds and installs the wheel into a fresh virtual environment and, from another
folder, loads the embedded pipeline and generates one image. Nothing is downloaded: the new environment sees this
environment's packages (torch, diffusers, ...) and ``--no-deps --no-build-isolation`` keeps pip offline.
"""
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from dgq_utils import paths

REPO = Path(__file__).resolve().parents[1]
#: what a source distribution holds (see MANIFEST.in): enough to build the wheel away from the checkout
SOURCE = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "dgq_utils", "data/embedded"]

SCRIPT = r"""
import json, sys
import torch
import dgq_utils
from dgq_utils import paths
pipe = dgq_utils.load_pipeline()
image = pipe("a small red circle on the left", num_inference_steps=4,
             generator=torch.Generator().manual_seed(0)).images[0]
print(json.dumps({"package": dgq_utils.__file__, "embedded": str(paths.embedded_dir()),
                  "outputs": str(paths.output_dir()), "cache": str(paths.cache_dir()), "size": list(image.size),
                  "mean": float(torch.tensor(list(image.getdata()), dtype=torch.float32).mean())}))
"""


def test_paths_prefer_the_environment_then_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("DGQ_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("DGQ_OUTPUT_DIR", str(tmp_path / "o"))
    assert paths.embedded_dir() == tmp_path / "d" / "embedded" and paths.output_dir() == tmp_path / "o"
    assert paths.cache_dir() == tmp_path / "d" / "cache"
    monkeypatch.delenv("DGQ_DATA_DIR")
    monkeypatch.delenv("DGQ_OUTPUT_DIR")
    if not (paths.PACKAGE_DATA / "embedded").is_dir():  # a checkout: data/ of the repository
        assert paths.embedded_dir() == REPO / "data" / "embedded" and paths.output_dir() == REPO / "outputs"
        assert paths.cache_dir() == REPO / "data" / "cache"


@pytest.mark.slow
def test_non_editable_install_loads_the_embedded_model_elsewhere(tmp_path):
    if not (REPO / "data" / "embedded" / "pipeline" / "model_index.json").is_file():
        pytest.skip("data/embedded is not in this checkout")
    src = tmp_path / "src"
    for rel in SOURCE:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        if (REPO / rel).is_dir():
            shutil.copytree(REPO / rel, src / rel, ignore=shutil.ignore_patterns("__pycache__", "cache"))
        else:
            shutil.copy2(REPO / rel, src / rel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    # A venv made from inside a venv gets the *base* interpreter's site-packages as its system ones, not this
    # environment's (where torch & co. are): add them as plain paths (their own .pth files, e.g. an editable
    # install of this checkout, are not processed from there, and the new venv's site-packages come first).
    new_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    (new_site / "_dgq_test_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DGQ_DATA_DIR", "DGQ_OUTPUT_DIR")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # the venv's own bundled setuptools (older, no built-in bdist_wheel) would shadow this environment's one
    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True, env=env)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
                   check=True, env=env, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(src)  # the installed package must not need the source tree
    run = subprocess.run([str(py), "-c", SCRIPT], check=True, capture_output=True, text=True, env=env,
                         cwd=elsewhere)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(got["package"]).is_relative_to(new_site)
    assert Path(got["embedded"]) == new_site / "dgq_utils" / "data" / "embedded"
    assert Path(got["outputs"]) == elsewhere / "outputs" and Path(got["cache"]) == elsewhere / "outputs" / "cache"
    assert got["size"] == [64, 64] and 0 < got["mean"] < 255
