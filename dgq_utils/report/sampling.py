"""The report's sampler settings: the model family's steps and guidance unless the run sets them; quick mode's cap.

The notebooks declare ``num_inference_steps = None`` and ``guidance_scale = None``. ``None`` means the value the
model's family is normally run with (:data:`dgq_utils.model.loading.FAMILY_SAMPLER_DEFAULTS`: the embedded model,
SD 1.x and 2.x 25 steps at guidance 7.5, SDXL 25 at 5.0, SDXL-Turbo 4 at 0.0); a ``-p`` value is used as given.
Quick mode (the CI smoke run) then caps the steps at :data:`QUICK_MAX_STEPS`. Calibration and every generation of a
notebook use the one resolved sampler, so each UNet call of the evaluation has its own calibrated parameter set
(SDXL-Turbo: 4 sets, one per step).

:func:`report_sampling` is the one place this is decided: :func:`dgq_utils.report.session.setup` builds the
notebooks' sampler with it and :func:`dgq_utils.report.runs.start_run` records the same values in ``run.json``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from dgq_utils.config import validation as V
from dgq_utils.model.loading import FAMILY_SAMPLER_DEFAULTS

__all__ = ["QUICK_MAX_STEPS", "ReportSampling", "report_sampling"]

#: sampling steps of a quick run at most (what the notebooks' quick cells used to set one by one)
QUICK_MAX_STEPS = 4


@dataclass(frozen=True)
class ReportSampling:
    """Steps and guidance of a report run and where each came from (``"family"``, ``"parameter"``; a step count
    shortened by quick mode says ``"... , quick cap"``)."""

    family: str
    num_inference_steps: int
    guidance_scale: float
    steps_from: str
    guidance_from: str

    def as_record(self) -> dict:
        """What ``run.json`` records under ``settings["sampler"]``."""
        return asdict(self)

    def describe(self) -> str:
        """One line for a notebook's set-up output."""
        return (f"sampler of the {self.family} family: {self.num_inference_steps} steps ({self.steps_from}), "
                f"guidance {self.guidance_scale:g} ({self.guidance_from})")


def report_sampling(family: str, num_inference_steps: int | None = None, guidance_scale: float | None = None, *,
                    quick: bool = False) -> ReportSampling:
    """The steps and guidance a report notebook runs with on a model of ``family`` (see the module docstring).

    ``num_inference_steps`` / ``guidance_scale``: the notebook parameters; ``None`` takes the family's value.
    An unknown family or a bad value raises an ``InvalidArgumentError`` naming the argument.
    """
    V.check_choice(family, "family", tuple(FAMILY_SAMPLER_DEFAULTS))
    defaults = FAMILY_SAMPLER_DEFAULTS[family]
    if num_inference_steps is None:
        steps, steps_from = int(defaults["num_inference_steps"]), "family default"
    else:
        steps = V.check_count(num_inference_steps, "num_inference_steps", 1,
                              fix="or None for the model family's default.")
        steps_from = "parameter"
    if guidance_scale is None:
        guidance, guidance_from = float(defaults["guidance_scale"]), "family default"
    else:
        guidance = float(V.check_number(guidance_scale, "guidance_scale", minimum=0.0,
                                        fix="or None for the model family's default."))
        guidance_from = "parameter"
    if quick and steps > QUICK_MAX_STEPS:
        steps, steps_from = QUICK_MAX_STEPS, f"{steps_from}, quick cap"
    return ReportSampling(family, steps, guidance, steps_from, guidance_from)
