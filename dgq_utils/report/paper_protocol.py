"""Notebook 05's branch for the paper's own protocol: SD v1.4 on MS-COCO captions, FID / IS / CLIP score.

Given local copies of the protocol's files (captions, the FID reference statistics, the Inception and CLIP
weights), :func:`run_protocol_comparison` runs :func:`dgq_utils.evaluate.protocol.run_paper_protocol` with the
notebook's prompt counts, sampler (at 512 x 512, the paper's resolution), seed and calibrated-state cache.
"""
from __future__ import annotations

from typing import Any, Sequence

from dgq_utils.evaluate.config import BootstrapConfig
from dgq_utils.evaluate.protocol import ProtocolConfig, ProtocolFiles, run_paper_protocol
from dgq_utils.quantize.pipeline import dequantize_pipeline
from dgq_utils.report.session import Session

__all__ = [
    "PROTOCOL_METRICS",
    "run_protocol_comparison",
]

#: the metrics the paper protocol reports
PROTOCOL_METRICS = ["fid", "isc", "clip_score", "psnr", "ssim"]


def run_protocol_comparison(session: Session, files: ProtocolFiles, recipes: Sequence[Any], *,
                            bootstrap: BootstrapConfig):
    """FP vs ``recipes`` under the paper's protocol on ``session``'s model (a real SD checkpoint).

    ``session.config.n_prompts`` images per recipe (CLIP score on at most 3000 of them, as the paper),
    ``n_calibration`` calibration captions, the session's sampler at 512 x 512 and its state cache. The FP
    pipeline is the session's, dequantized before each use. Returns ``run_paper_protocol``'s result.
    """
    cfg = session.config
    if not cfg.n_prompts or not cfg.n_calibration:
        raise ValueError("run_protocol_comparison: the session needs n_prompts and n_calibration (set them in the "
                         "notebook's parameters cell)")
    ctx = session.ctx

    def fp_pipe():
        dequantize_pipeline(ctx.pipe)
        return ctx.pipe

    return run_paper_protocol(
        files,
        ctx.run_dir("05-protocol", n=cfg.n_prompts, steps=session.sampler.num_inference_steps,
                    guidance=session.sampler.guidance_scale, seed=cfg.seed),
        recipes=list(recipes),
        protocol=ProtocolConfig(n_images=cfg.n_prompts, n_clip=min(3000, cfg.n_prompts),
                                n_calibration=cfg.n_calibration),
        sampler=session.sampler.replace(height=512, width=512),
        bootstrap=bootstrap, device=cfg.device, pipe_factory=fp_pipe, states=session.states)
