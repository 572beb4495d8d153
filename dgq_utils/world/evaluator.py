"""The attribute evaluator: a small CNN trained on real rendered scenes, and alignment scoring.

``AttributeEvaluator`` wraps :class:`~dgq_utils.world.models.AttributeClassifier`: it takes images (a
float tensor in [0, 1], a uint8 tensor, PIL images or numpy arrays, any size -- resized to 64x64) and
predicts the canonical attributes (layout + slot-ordered colour/shape/size, see
:func:`dgq_utils.world.scenes.canonical_targets`). :func:`alignment` compares predictions with the
attributes the prompts state, per attribute and for the whole caption.

Definitions (one row per generated image):

* one object: ``count`` (the evaluator sees one object), ``position``, ``colour``, ``shape``, ``size``;
  ``whole`` = all of them right.
* two objects, slots in canonical order: ``count``; ``colour``/``shape``/``size`` = fraction of the two
  objects whose attribute is right *in its place*; ``relation`` = the axis is right and the objects are in
  the stated order (the direct assignment matches more attributes than the swapped one);
  ``objects_present`` = both stated (colour, shape) pairs are seen, in any place; ``whole`` = axis and all
  six object attributes right.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dgq_utils.world import scenes as W
from dgq_utils.world.models import HEADS, AttributeClassifier

N_POS = len(W.POSITIONS)


def images_to_tensor(images, size: int = W.IMAGE_SIZE) -> torch.Tensor:
    """PIL list / numpy (B,H,W,3) / tensor (B,3,H,W) uint8 or float in [0,1] -> float (B,3,size,size)."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(images)
        if x.ndim == 3:
            x = x[None]
        x = x.permute(0, 3, 1, 2)
    else:
        x = images
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mild training augmentation (noise, blur, brightness/contrast) so the evaluator tolerates the small
    artefacts of generated images. Applied to 80 % of the batch."""
    B = x.shape[0]
    dev = x.device

    def r(*shape):
        return torch.rand(*shape, generator=generator, device=generator.device if generator else dev).to(dev)

    on = (r(B) < 0.8).float().view(B, 1, 1, 1)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    a = r(B).view(B, 1, 1, 1) * 0.6
    y = x * (1 - a) + blur * a
    c = 0.9 + 0.2 * r(B).view(B, 1, 1, 1)
    b = (r(B).view(B, 1, 1, 1) - 0.5) * 0.08
    y = (y - 0.5) * c + 0.5 + b
    noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else dev).to(dev)
    y = y + noise * r(B).view(B, 1, 1, 1) * 0.04
    return (on * y + (1 - on) * x).clamp(0, 1)


def classifier_loss(out: dict, targets: dict) -> torch.Tensor:
    loss = F.cross_entropy(out["layout"].float(), targets["layout"])
    for j in range(2):
        for name in ("colour", "shape", "size"):
            t = targets[name][:, j]
            mask = t >= 0
            if mask.any():
                loss = loss + F.cross_entropy(out[f"{name}{j}"].float()[mask], t[mask])
    return loss


def predictions(out: dict) -> dict[str, torch.Tensor]:
    return {
        "layout": out["layout"].argmax(-1),
        "colour": torch.stack([out["colour0"].argmax(-1), out["colour1"].argmax(-1)], 1),
        "shape": torch.stack([out["shape0"].argmax(-1), out["shape1"].argmax(-1)], 1),
        "size": torch.stack([out["size0"].argmax(-1), out["size1"].argmax(-1)], 1),
    }


def is_logits(out: dict) -> torch.Tensor:
    """40 log-probabilities of (colour, shape) of slot 0: the classes of the IS-style score."""
    lc = F.log_softmax(out["colour0"].float(), -1)
    ls = F.log_softmax(out["shape0"].float(), -1)
    return (lc[:, :, None] + ls[:, None, :]).flatten(1)


def inception_style_score(logp: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) over the given log-probabilities (one split, no resampling)."""
    p = logp.exp()
    py = p.mean(0, keepdim=True)
    kl = (p * (logp - torch.log(py + 1e-12))).sum(1)
    return float(kl.mean().exp())


class AttributeEvaluator:
    """Trained evaluator: ``predict`` images, ``features`` (penultimate, for FID), ``score`` vs prompts."""

    def __init__(self, model: AttributeClassifier, device="cpu", meta: dict | None = None):
        self.model = model.to(device).eval().float()
        self.device = torch.device(device)
        self.meta = meta or {}

    @classmethod
    def load(cls, folder: str | Path, device="cpu") -> "AttributeEvaluator":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "model.safetensors").exists():
            raise FileNotFoundError(f"No evaluator weights in {folder} (expected model.safetensors, config.json).")
        meta = json.loads((folder / "config.json").read_text())
        model = AttributeClassifier(width=meta["width"], feature_dim=meta["feature_dim"])
        sd = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
        model.load_state_dict(sd)
        return cls(model, device, meta)

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in self.model.state_dict().items()}
        save_file(sd, str(folder / "model.safetensors"))
        meta = {**self.model.config, "heads": HEADS, "layouts": list(W.LAYOUTS), "colours": list(W.COLOUR_NAMES),
                "shapes": list(W.SHAPES), "sizes": list(W.SIZES), **(self.meta or {}), **(extra or {})}
        (folder / "config.json").write_text(json.dumps(meta, indent=2))

    @torch.no_grad()
    def outputs(self, images, batch_size: int = 256) -> dict[str, torch.Tensor]:
        x = images_to_tensor(images)
        outs = []
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(self.device)
            o = self.model(xb)
            o["penultimate"] = self.model.penultimate(xb)
            outs.append({k: v.float().cpu() for k, v in o.items()})
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def predict(self, images) -> dict[str, torch.Tensor]:
        return predictions(self.outputs(images))

    def features(self, images) -> torch.Tensor:
        return self.outputs(images)["penultimate"]

    def score(self, images, prompts: Sequence[str] | W.Scenes) -> dict:
        """Per-image alignment (dict of bool/float tensors) of ``images`` with ``prompts``."""
        scenes = prompts if isinstance(prompts, W.Scenes) else W.scenes_from_captions(list(prompts))
        return alignment(self.predict(images), scenes)


def alignment(pred: dict[str, torch.Tensor], scenes: W.Scenes) -> dict[str, torch.Tensor]:
    """Per-image alignment of canonical predictions with the attributes the scenes (prompts) state."""
    t = W.canonical_targets(scenes)
    two = scenes.n_objects == 2
    lp, lt = pred["layout"], t["layout"]
    m = {k: (pred[k] == t[k]) for k in ("colour", "shape", "size")}          # (B, 2) slot-wise
    out = {"two": two}
    out["count"] = torch.where(two, lp >= N_POS, lp < N_POS)
    out["position"] = (lp == lt) & ~two
    out["axis"] = (lp == lt) & two
    for k in ("colour", "shape", "size"):
        out[k] = torch.where(two, m[k].float().mean(1), m[k][:, 0].float())
    direct = sum(m[k].float().sum(1) for k in m)
    swapped = sum((pred[k].flip(1) == t[k]).float().sum(1) for k in m)
    out["relation"] = out["axis"] & (direct > swapped)
    pair = t["colour"] * len(W.SHAPES) + t["shape"]
    pred_pair = pred["colour"] * len(W.SHAPES) + pred["shape"]
    seen = (pair[:, :, None] == pred_pair[:, None, :]).any(-1)               # (B, 2)
    out["objects_present"] = torch.where(two, seen.all(1), seen[:, 0])
    all_one = m["colour"][:, 0] & m["shape"][:, 0] & m["size"][:, 0]
    all_two = m["colour"].all(1) & m["shape"].all(1) & m["size"].all(1)
    out["whole"] = torch.where(two, out["axis"] & all_two, out["position"] & all_one)
    return out


def summarize(align: dict[str, torch.Tensor], mask: torch.Tensor | None = None) -> dict:
    """Mean accuracies, separately for one- and two-object prompts (and overall ``whole``)."""
    two = align["two"] if mask is None else align["two"][mask]
    sel = (lambda v: v) if mask is None else (lambda v: v[mask])
    res: dict = {"n": int(two.numel())}
    one_keys = ("count", "position", "colour", "shape", "size", "whole")
    two_keys = ("count", "relation", "colour", "shape", "size", "objects_present", "whole")
    for name, keys, g in (("one_object", one_keys, ~two), ("two_objects", two_keys, two)):
        if g.any():
            res[name] = {"n": int(g.sum())}
            for k in keys:
                res[name][k] = round(float(sel(align[k]).float()[g].mean()), 4)
    res["whole"] = round(float(sel(align["whole"]).float().mean()), 4)
    return res


def real_accuracy(evaluator: AttributeEvaluator, scenes: W.Scenes, images: torch.Tensor | None = None) -> dict:
    """The evaluator's own accuracy on real rendered scenes: per head, and all canonical labels right."""
    images = W.render(scenes, evaluator.device).cpu() if images is None else images
    pred = evaluator.predict(images)
    t = W.canonical_targets(scenes)
    two = scenes.n_objects == 2
    res = {"layout": float((pred["layout"] == t["layout"]).float().mean())}
    ok = pred["layout"] == t["layout"]
    for k in ("colour", "shape", "size"):
        slot_ok = (pred[k] == t[k]) | (t[k] < 0)
        res[k] = float(torch.cat([(pred[k][:, 0] == t[k][:, 0]), (pred[k][two, 1] == t[k][two, 1])]).float().mean())
        ok = ok & slot_ok.all(1)
    res["all_labels"] = float(ok.float().mean())
    res["n"] = len(scenes)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}
