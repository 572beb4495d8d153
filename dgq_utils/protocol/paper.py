"""The paper's two protocols and its Table 2, as data: which model, sampler and recipes each row needs.

* :data:`PROTOCOLS` -- ``"sd-v1.4"`` (SD v1.4: PNDM/PLMS, 25 steps, guidance 7.5, 512x512) and ``"sdxl-turbo"``
  (SDXL-Turbo: its Euler-ancestral sampler, 4 steps, guidance 0, 512x512). Both: 30,000 MS-COCO val2014 captions
  (one image each, seed 42), resized to 256 for FID (vs BK-SDM's ``real_im256.npz``) / IS / CLIP (open_clip
  ViT-g-14 on the first 3,000), 64 COCO captions for calibration, and CLIP on the first 3,000 images of
  PartiPrompts (the first 1,000 prompts x 3 images, at 512) -- ``shared/dgq-official-code.md`` sections 4, 6, 7.
* :func:`paper_table2` -- the paper's numbers (``paper_table2.csv`` beside this module, the one copy: the report's
  ``PAPER_TABLE2`` reads it too).
* :func:`plan_entries` -- the paper's settings (W8A8 / W8A6 / W4A8 / W4A6) x methods x K mapped to this
  repository's presets: DGQ with K groups is ``dgq-wXaY`` (K = 16) or ``dgq-wXaY-g<K>``; the paper's per-tensor
  baselines have stand-ins, *not* the original methods: "TFMQ" = ``baseline-wXaY`` (per-tensor activations, one
  parameter set per timestep), "Q-Diff" = ``baseline-wXaY-shared`` (one set for all timesteps). Neither has the
  original's weight reconstruction (BRECQ/AdaRound) or TFMQ's temporal-feature maintenance.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dgq_utils.config import SamplerSettings
from dgq_utils.config import validation as V
from dgq_utils.config.presets import PRESETS
from dgq_utils.evaluate.protocol import PAPER_SAMPLER

__all__ = [
    "METHODS",
    "PAPER_TABLE2_FILE",
    "PROTOCOLS",
    "PaperProtocol",
    "SETTINGS",
    "TableEntry",
    "paper_table2",
    "parse_setting",
    "plan_entries",
    "recipe_for",
]

#: the paper's numbers (one copy; columns: model, bits, method, k, size_mb, bops_t, is, fid, clip_score, parti_clip)
PAPER_TABLE2_FILE = Path(__file__).with_name("paper_table2.csv")

#: the paper's quantized settings, in its order
SETTINGS = ("W8A8", "W8A6", "W4A8", "W4A6")
#: command-line method name -> the paper's label
METHODS = {"dgq": "DGQ", "tfmq": "TFMQ", "qdiff": "Q-Diff"}
#: DGQ group counts that have presets (``dgq-wXaY`` is K = 16, ``dgq-wXaY-g8`` / ``-g4``)
K_VALUES = (4, 8, 16)

#: the PartiPrompts part: the official script scores the first 3,000 images = first 1,000 prompts x 3 images
PAPER_N_PARTI_PROMPTS = 1_000
PAPER_PARTI_IMAGES_PER_PROMPT = 3


@dataclass(frozen=True)
class PaperProtocol:
    """One of the paper's evaluation set-ups.

    ``families``: the model families (:func:`dgq_utils.model.loading.model_family`) it accepts; ``model_source``:
    where the paper's weights come from; ``sampler``: what every image (and calibration) is made with;
    ``default_k``: the K values the paper reports for DGQ on this model.
    """

    name: str
    title: str
    families: tuple[str, ...]
    model_source: str
    sampler: SamplerSettings
    default_k: tuple[int, ...]


PROTOCOLS: dict[str, PaperProtocol] = {
    "sd-v1.4": PaperProtocol(
        "sd-v1.4", "SD v1.4, MS-COCO", ("sd1",),
        "CompVis/stable-diffusion-v1-4 on the Hugging Face Hub (huggingface-cli download "
        "CompVis/stable-diffusion-v1-4 --local-dir DIR on a connected machine)",
        PAPER_SAMPLER, (16,)),
    "sdxl-turbo": PaperProtocol(
        "sdxl-turbo", "SDXL-Turbo, MS-COCO", ("sdxl-turbo",),
        "stabilityai/sdxl-turbo on the Hugging Face Hub (huggingface-cli download stabilityai/sdxl-turbo "
        "--local-dir DIR on a connected machine)",
        SamplerSettings(num_inference_steps=4, guidance_scale=0.0, height=512, width=512, batch_size=8), (8,)),
}

_SETTING = re.compile(r"^\s*w?(\d+)\s*(?:a|/)\s*(\d+)\s*$", re.IGNORECASE)


def parse_setting(text: str) -> str:
    """``"W8A8"`` from ``"w8a8"``, ``"W8A8"`` or ``"8/8"``; anything else (or W32A32) is refused, naming the allowed."""
    m = _SETTING.match(str(text))
    name = f"W{m.group(1)}A{m.group(2)}" if m else None
    if name not in SETTINGS:
        raise V.fail("--settings", text, f"{', '.join(SETTINGS)} (the paper's; FP is always run)",
                     "e.g. --settings W8A8 W8A6.")
    return name


def recipe_for(method: str, setting: str, k: int | None = None) -> str:
    """The preset that stands for ``method`` (``dgq``/``tfmq``/``qdiff``) at ``setting`` (``"W8A6"``), K groups
    (DGQ only)."""
    V.check_choice(method, "method", tuple(METHODS))
    s = parse_setting(setting).lower()
    if method == "dgq":
        V.check_choice(k, "--k", K_VALUES)
        name = f"dgq-{s}" if k == 16 else f"dgq-{s}-g{k}"
    else:
        name = f"baseline-{s}" if method == "tfmq" else f"baseline-{s}-shared"
    if name not in PRESETS:  # a preset renamed under us: say so rather than run something else
        raise KeyError(f"no preset {name!r} for {METHODS[method]} {setting}; see dgq_utils/config/presets.py")
    return name


@dataclass(frozen=True)
class TableEntry:
    """One cell group of Table 2: ``setting`` (``"W32A32"`` for FP) x ``method`` (paper label) x ``k``, run as
    ``recipe`` (a preset name)."""

    setting: str
    method: str
    k: int | None
    recipe: str

    @property
    def label(self) -> str:
        return f"{self.method} K={self.k}" if self.k is not None else self.method


FP_ENTRY = TableEntry("W32A32", "FP", None, "fp")


def plan_entries(settings=SETTINGS, ks=(16,), methods=("dgq",)) -> list[TableEntry]:
    """FP first, then per setting: the baselines asked for, then DGQ for each K (the paper's row order)."""
    settings = [parse_setting(s) for s in settings]
    if not settings:
        raise V.fail("--settings", settings, f"one or more of {', '.join(SETTINGS)}")
    methods = [V.check_choice(m, "--methods", tuple(METHODS)) for m in methods]
    if not methods:
        raise V.fail("--methods", methods, f"one or more of {', '.join(METHODS)}")
    if "dgq" in methods:
        if not ks:
            raise V.fail("--k", ks, f"one or more of {', '.join(map(str, K_VALUES))}")
        ks = [V.check_choice(k, "--k", K_VALUES) for k in ks]
    out = [FP_ENTRY]
    for s in dict.fromkeys(settings):
        for m in ("qdiff", "tfmq"):
            if m in methods:
                out.append(TableEntry(s, METHODS[m], None, recipe_for(m, s)))
        if "dgq" in methods:
            for k in sorted(dict.fromkeys(ks)):
                out.append(TableEntry(s, "DGQ", k, recipe_for("dgq", s, k)))
    return out


def paper_table2(model: str | None = None) -> pd.DataFrame:
    """The paper's Table 2 (``model``: ``"sd-v1.4"`` / ``"sdxl-turbo"`` rows only, without the model column;
    ``None``: every row). ``k`` is a nullable integer (empty for FP and the baselines)."""
    df = pd.read_csv(PAPER_TABLE2_FILE, dtype={"k": "Int64"})
    if model is None:
        return df
    V.check_choice(model, "model", tuple(df["model"].unique()))
    return df[df["model"] == model].drop(columns="model").reset_index(drop=True)
