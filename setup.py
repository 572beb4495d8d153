"""Build hook: put the embedded model (``data/embedded``) into the wheel as ``dgq_utils/data/embedded``.

Everything else about the package is in ``pyproject.toml``. ``data/`` sits beside the package in the repository
(it is also what ``scripts/train_embedded.py`` writes), so setuptools' ``package-data`` cannot reach it; this
``build_py`` copies it into the build tree, and :mod:`dgq_utils.paths` looks there first in an installed package.
Editable installs (``pip install -e .``) skip the copy: they read ``data/`` of the checkout.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

EMBEDDED = Path(__file__).resolve().parent / "data" / "embedded"
SKIP = shutil.ignore_patterns("logs", "__pycache__", "*.tmp*")


class BuildPyWithEmbeddedModel(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        if not (EMBEDDED / "pipeline" / "model_index.json").is_file():
            raise SystemExit(f"cannot build the wheel: the embedded model is missing ({EMBEDDED}/pipeline); "
                             "restore data/embedded from git or retrain it with scripts/train_embedded.py")
        target = Path(self.build_lib) / "dgq_utils" / "data" / "embedded"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(EMBEDDED, target, ignore=SKIP)


setup(cmdclass={"build_py": BuildPyWithEmbeddedModel})
