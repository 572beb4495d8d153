"""The protocol's local input files: what each is, where the paper's copy comes from, and one check for all.

Nothing is downloaded. :func:`check_inputs` runs on every rank before any model is loaded, so a missing or wrong
file fails at once (naming the command-line option, the path, and where to get the paper's copy) instead of
after hours of generation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dgq_utils.evaluate import metrics as M

__all__ = ["INPUTS", "InputFile", "MissingInput", "check_inputs", "check_model_folder"]


class MissingInput(FileNotFoundError):
    """A protocol input is missing or is not what it should be (the message names the option and the source)."""


@dataclass(frozen=True)
class InputFile:
    option: str
    what: str
    source: str
    folder: bool = False


INPUTS = {
    "coco_captions": InputFile(
        "--coco-captions", "the 30k MS-COCO val2014 evaluation captions (BK-SDM's metadata.csv; any CSV/TSV with a "
        "'caption' column or a COCO captions_*.json works)",
        "BK-SDM's data/mscoco_val2014_30k/metadata.csv, fetched by scripts/get_mscoco_files.sh of "
        "github.com/Nota-NetsPresso/BK-SDM"),
    "fid_reference": InputFile(
        "--fid-reference", "the FID reference statistics (mu/sigma of Inception pool features of val2014 at 256 px)",
        "BK-SDM's data/mscoco_val2014_41k_full/real_im256.npz (same get_mscoco_files.sh), or make one with "
        "python -m pytorch_fid --save-stats from the val2014 images resized to 256"),
    "inception_weights": InputFile(
        "--inception-weights", "torch-fidelity's Inception-v3 FID weights",
        f"{M.INCEPTION_WEIGHTS_FILE}, a release asset of github.com/toshas/torch-fidelity (v0.2.0)"),
    "clip_weights": InputFile(
        "--clip-weights", "the open_clip weights of the CLIP score model",
        "for ViT-g-14 laion2b_s34b_b88k: open_clip_pytorch_model.bin of the Hugging Face repo "
        "laion/CLIP-ViT-g-14-laion2B-s34B-b88K"),
    "calibration_captions": InputFile(
        "--calibration-captions", "the captions calibration is sampled from (64, seed 42)",
        "COCO's annotations/captions_train2017.json (annotations_trainval2017.zip from cocodataset.org); "
        "without this option the captions after the evaluation rows of --coco-captions are used"),
    "partiprompts": InputFile(
        "--partiprompts", "the PartiPrompts prompt list (a TSV with a 'Prompt' column)",
        "PartiPrompts.tsv at the root of github.com/google-research/parti"),
}


def _missing(key: str, path, problem: str) -> MissingInput:
    spec = INPUTS[key]
    return MissingInput(f"{spec.option}: {problem}: {path}. It should be {spec.what}. The paper's copy: "
                        f"{spec.source}. Download it on a connected machine and pass the local path.")


def check_inputs(paths: dict[str, str | os.PathLike | None]) -> dict[str, Path | None]:
    """Every given path of :data:`INPUTS` (keys as there; ``None`` = not given) exists as a file; returns Paths.

    Raises :class:`MissingInput` for the first that does not.
    """
    out: dict[str, Path | None] = {}
    for key, path in paths.items():
        if key not in INPUTS:
            raise KeyError(f"unknown protocol input {key!r}; known: {', '.join(INPUTS)}")
        if path is None:
            out[key] = None
            continue
        p = Path(path).expanduser()
        if not p.exists():
            raise _missing(key, p, "file not found")
        if not p.is_file():
            raise _missing(key, p, "not a file")
        out[key] = p
    return out


def check_model_folder(path: str | os.PathLike | None, protocol_title: str, source: str) -> Path:
    """``path`` is a local diffusers pipeline folder (with ``model_index.json``); else :class:`MissingInput`
    naming ``--model`` and ``source`` (where the paper's weights come from)."""
    if path is None:
        raise MissingInput(f"--model: no model folder given; {protocol_title} needs a local diffusers folder: "
                           f"{source}.")
    p = Path(path).expanduser()
    if not (p / "model_index.json").is_file():
        problem = "no such folder" if not p.exists() else "not a diffusers pipeline folder (no model_index.json)"
        raise MissingInput(f"--model: {problem}: {p}. {protocol_title} needs the paper's weights as a local "
                           f"diffusers folder: {source}.")
    return p
