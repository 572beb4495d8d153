"""The synthetic captioned world: attributes, sampling, vectorised rendering, captions and splits.

A *scene* is one 64x64 RGB image with one or two flat objects on a plain grey background. Objects are
described in **caption order** (object A is the first one the caption mentions):

* one object: size, colour, shape and an absolute position (``on the left`` ...);
* two objects: size, colour and shape of A and of B and the relation of A to B (``above`` ...).

Everything is a tensor so that sampling happens on the CPU (a seeded ``torch.Generator``: the same seed
gives the same scenes on every machine) and rendering runs on any device (the training run renders its
data on the GPU on the fly; the tests render on the CPU). Rendering uses signed distance functions on the
pixel grid with a one-pixel linear ramp, i.e. anti-aliased edges.

The *canonical* form of a scene (what the evaluator predicts) does not depend on the caption's wording:
``layout`` is one of the five positions for one object, or ``vertical``/``horizontal`` for two objects, and
slot 0 is the upper (vertical) or left (horizontal) object. ``A below B`` and ``B above A`` are the same
canonical scene.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

IMAGE_SIZE = 64

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "cyan": (40, 205, 215),
    "blue": (40, 80, 225),
    "purple": (145, 60, 200),
    "white": (245, 245, 245),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
RELATIONS: tuple[str, ...] = ("above", "below", "left", "right")
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATION_PHRASES: dict[str, str] = {
    "above": "above",
    "below": "below",
    "left": "to the left of",
    "right": "to the right of",
}
# canonical layouts: the five positions of one object, then the two axes of a pair
LAYOUTS: tuple[str, ...] = POSITIONS + ("vertical", "horizontal")
BACKGROUND_NAME = "grey"

# (colour, shape) pairs that never appear in the training split of the generative model
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "circle"),
    ("green", "square"),
    ("yellow", "cross"),
    ("purple", "diamond"),
)

ONE_OBJECT_TEMPLATES: tuple[str, ...] = (
    "a {a} {pos}",
    "{pos} there is a {a}",
    "a picture of a {a} {pos}",
    "a {a} {pos} on a grey background",
    "there is a {a} {pos}",
)
TWO_OBJECT_TEMPLATES: tuple[str, ...] = (
    "a {a} {rel} a {b}",
    "a picture of a {a} {rel} a {b}",
    "there is a {a} {rel} a {b}",
    "a {a} {rel} a {b} on a grey background",
    "a {a} is {rel} a {b}",
)
# words the tokenizer knows beyond those the templates use (kept as single tokens, never trained on)
EXTRA_WORDS: tuple[str, ...] = ("an", "and", "with", "image", "photo", "of", "shape", "object", "big", "tiny",
                                "scene", "simple", "drawing", "two", "one", "next")

SPLITS: tuple[str, ...] = ("train", "val", "test", "heldout", "evaluator")

# geometry (pixels, 64x64 canvas)
RADIUS = {"small": 6.0, "large": 10.0}
RADIUS_JITTER = 0.3
POSITION_ANCHORS = {"left": (16.0, 32.0), "right": (48.0, 32.0), "top": (32.0, 16.0), "bottom": (32.0, 48.0),
                    "center": (32.0, 32.0)}
POSITION_JITTER = 4.0
PAIR_NEAR, PAIR_FAR, PAIR_JITTER = 16.0, 48.0, 3.0   # the relation axis
PAIR_CROSS = (22.0, 42.0)                             # the other axis, uniform
COLOUR_JITTER = 0.04
BACKGROUND_GREY, BACKGROUND_JITTER = 0.5, 0.03


def vocabulary() -> list[str]:
    """Every word a caption of this world can use, plus a few generic words (sorted, unique)."""
    words: set[str] = set(COLOUR_NAMES) | set(SHAPES) | set(SIZES) | set(EXTRA_WORDS) | {BACKGROUND_NAME}
    for phrase in list(POSITION_PHRASES.values()) + list(RELATION_PHRASES.values()):
        words |= set(phrase.split())
    for t in ONE_OBJECT_TEMPLATES + TWO_OBJECT_TEMPLATES:
        words |= {w for w in t.split() if not w.startswith("{")}
    return sorted(words)


def split_seed(seed: int, split: str) -> int:
    """The generator seed of ``split`` for a user ``seed``: 62 bits of SHA-256 (splits never share noise)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    digest = hashlib.sha256(f"{seed}/{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def _combo_table(kind: str) -> torch.Tensor:
    """(N, 2) long tensor of (colour, shape) index pairs: 'train' = all but held-out, 'heldout', 'all'."""
    held = {(COLOUR_NAMES.index(c), SHAPES.index(s)) for c, s in HELDOUT_COMBOS}
    every = [(c, s) for c in range(len(COLOUR_NAMES)) for s in range(len(SHAPES))]
    rows = {"all": every, "heldout": sorted(held), "train": [p for p in every if p not in held]}[kind]
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class Scenes:
    """A batch of scenes (all tensors have batch dimension B first; slot 1 is -1 / 0 for one object)."""

    n_objects: torch.Tensor      # (B,) 1 or 2
    layout: torch.Tensor         # (B,) position index (one object) or relation index (two objects)
    colour: torch.Tensor         # (B, 2) caption order
    shape: torch.Tensor          # (B, 2)
    size: torch.Tensor           # (B, 2)
    template: torch.Tensor       # (B,)
    center: torch.Tensor         # (B, 2, 2) x, y in pixels
    radius: torch.Tensor         # (B, 2) pixels
    rgb: torch.Tensor            # (B, 2, 3) in [0, 1]
    background: torch.Tensor     # (B, 3) in [0, 1]
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.n_objects.shape[0])

    def to(self, device) -> "Scenes":
        return Scenes(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})

    def __getitem__(self, idx) -> "Scenes":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Scenes(**{k: (v[idx] if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})

    @staticmethod
    def cat(items: Sequence["Scenes"]) -> "Scenes":
        keys = [k for k, v in items[0].__dict__.items() if torch.is_tensor(v)]
        return Scenes(**{k: torch.cat([getattr(s, k) for s in items]) for k in keys})

    def attributes(self, i: int) -> dict:
        """Plain-python attributes of scene ``i`` in caption order (what a caption states)."""
        n = int(self.n_objects[i])
        objs = [
            {"size": SIZES[int(self.size[i, j])], "colour": COLOUR_NAMES[int(self.colour[i, j])],
             "shape": SHAPES[int(self.shape[i, j])]}
            for j in range(n)
        ]
        out = {"n_objects": n, "objects": objs}
        if n == 1:
            out["position"] = POSITIONS[int(self.layout[i])]
        else:
            out["relation"] = RELATIONS[int(self.layout[i])]
        return out


def sample_scenes(n: int, split: str = "train", seed: int = 0, *, p_two: float = 0.5,
                  generator: torch.Generator | None = None) -> Scenes:
    """Sample ``n`` scenes of ``split`` deterministically from ``seed`` (on the CPU).

    ``train``/``val``/``test`` draw each object's (colour, shape) from the 35 pairs that are not held out;
    ``heldout`` makes object A one of :data:`HELDOUT_COMBOS` (B is any other pair); ``evaluator`` (the
    classifier's own training stream) draws from all 40 pairs. Pass ``generator`` to continue a stream
    (the training loops do) instead of starting one from ``seed``.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(split_seed(seed, split))
    g = generator

    def randint(high, size):
        return torch.randint(0, high, size, generator=g)

    def uniform(size, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(size, generator=g)

    two = torch.rand(n, generator=g) < p_two
    n_obj = 1 + two.long()
    kind_a = {"train": "train", "val": "train", "test": "train", "heldout": "heldout", "evaluator": "all"}[split]
    kind_b = {"heldout": "all"}.get(split, kind_a)
    ta, tb = _combo_table(kind_a), _combo_table(kind_b)
    pa = ta[randint(len(ta), (n,))]
    pb = tb[randint(len(tb), (n,))]
    for _ in range(100):  # resample B where it equals A (a caption must tell the two apart)
        same = (pa == pb).all(-1)
        if not same.any():
            break
        pb[same] = tb[randint(len(tb), (int(same.sum()),))]
    colour = torch.stack([pa[:, 0], pb[:, 0]], 1)
    shape = torch.stack([pa[:, 1], pb[:, 1]], 1)
    size = randint(len(SIZES), (n, 2))
    pos = randint(len(POSITIONS), (n,))
    rel = randint(len(RELATIONS), (n,))
    layout = torch.where(two, rel, pos)
    t1 = randint(len(ONE_OBJECT_TEMPLATES), (n,))
    t2 = randint(len(TWO_OBJECT_TEMPLATES), (n,))
    template = torch.where(two, t2, t1)

    radius_base = torch.tensor([RADIUS[s] for s in SIZES])[size]
    radius = radius_base + uniform((n, 2), -RADIUS_JITTER, RADIUS_JITTER)
    # one object: anchor of its position + jitter
    anchors = torch.tensor([POSITION_ANCHORS[p] for p in POSITIONS])
    c_one = anchors[pos] + uniform((n, 2), -POSITION_JITTER, POSITION_JITTER)
    # two objects: A and B on the relation axis (near/far), uniform on the other axis
    near = PAIR_NEAR + uniform((n,), -PAIR_JITTER, PAIR_JITTER)
    far = PAIR_FAR + uniform((n,), -PAIR_JITTER, PAIR_JITTER)
    cross = uniform((n, 2), *PAIR_CROSS)
    a_first = (rel == 0) | (rel == 2)           # A above B / A left of B: A has the smaller coordinate
    a_axis = torch.where(a_first, near, far)
    b_axis = torch.where(a_first, far, near)
    vertical = rel < 2
    a_xy = torch.where(vertical[:, None], torch.stack([cross[:, 0], a_axis], 1), torch.stack([a_axis, cross[:, 0]], 1))
    b_xy = torch.where(vertical[:, None], torch.stack([cross[:, 1], b_axis], 1), torch.stack([b_axis, cross[:, 1]], 1))
    center = torch.where(two[:, None, None], torch.stack([a_xy, b_xy], 1), torch.stack([c_one, c_one], 1))

    palette = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32) / 255.0
    rgb = (palette[colour] + uniform((n, 2, 3), -COLOUR_JITTER, COLOUR_JITTER)).clamp(0, 1)
    background = (BACKGROUND_GREY + uniform((n, 1), -BACKGROUND_JITTER, BACKGROUND_JITTER)).expand(n, 3).clone()

    one = ~two
    colour[one, 1] = -1
    shape[one, 1] = -1
    size[one, 1] = -1
    return Scenes(n_objects=n_obj, layout=layout, colour=colour, shape=shape, size=size, template=template,
                  center=center, radius=radius, rgb=rgb, background=background)


# ---------------------------------------------------------------------------------------------- rendering
def _sdf_shapes(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distances (pixels; negative inside) of all shapes, stacked on a new last-but-2 axis.

    ``px``, ``py``: (..., H, W) offsets from the object's centre (y pointing *down*); ``r``: (..., 1, 1).
    Returns (..., len(SHAPES), H, W).
    """
    ax, ay = px.abs(), py.abs()
    # circle
    circle = torch.sqrt(px * px + py * py) - r
    # axis-aligned square with half side 0.85 r
    def box(hx, hy):
        dx, dy = ax - hx, ay - hy
        outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
        return outside + torch.maximum(dx, dy).clamp(max=0)
    square = box(0.85 * r, 0.85 * r)
    # diamond: square rotated by 45 degrees, half diagonal 1.15 r
    u, v = (px + py) / 2 ** 0.5, (px - py) / 2 ** 0.5
    h = 1.15 * r / 2 ** 0.5
    du, dv = u.abs() - h, v.abs() - h
    diamond = torch.sqrt(du.clamp(min=0) ** 2 + dv.clamp(min=0) ** 2) + torch.maximum(du, dv).clamp(max=0)
    # equilateral triangle pointing up, half side 1.3 r, centred on its bounding box
    k = 3 ** 0.5
    s = 1.3 * r
    qx = ax - s
    # centroid form (y up): vertices (+-s, -s/k) and (0, 2s/k); bounding-box centre is at y = s/(2k)
    qy = (-py + s / (2 * k)) + s / k
    flip = (qx + k * qy) > 0
    nx = torch.where(flip, (qx - k * qy) / 2, qx)
    ny = torch.where(flip, (-k * qx - qy) / 2, qy)
    nx = nx - torch.minimum(torch.maximum(nx, -2 * s), torch.zeros_like(nx))
    triangle = -torch.sqrt(nx * nx + ny * ny) * torch.sign(ny)
    # plus-shaped cross: arms of half length 1.1 r and half width 0.38 r
    cross = torch.minimum(box(1.1 * r, 0.38 * r), box(0.38 * r, 1.1 * r))
    return torch.stack([circle, square, triangle, diamond, cross], dim=-3)


def object_alpha(scenes: Scenes, device: torch.device | str | None = None, size: int = IMAGE_SIZE,
                 antialias: bool = True) -> torch.Tensor:
    """Coverage (B, 2, size, size) in [0, 1] of each object slot (zero for an absent slot)."""
    dev = torch.device(device) if device is not None else scenes.center.device
    s = scenes.to(dev)
    B = len(s)
    scale = size / IMAGE_SIZE
    coords = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / scale
    ys, xs = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)
    px = xs - s.center[:, :, 0, None, None]          # (B, 2, 1, W)
    py = ys - s.center[:, :, 1, None, None]          # (B, 2, H, 1)
    px, py = torch.broadcast_tensors(px, py)          # (B, 2, H, W)
    sdf_all = _sdf_shapes(px, py, s.radius[:, :, None, None])        # (B, 2, S, H, W)
    idx = s.shape.clamp(min=0)[:, :, None, None, None].expand(B, 2, 1, size, size)
    sdf = sdf_all.gather(2, idx).squeeze(2) * scale                  # (B, 2, H, W) in output pixels
    alpha = (0.5 - sdf).clamp(0, 1) if antialias else (sdf <= 0).float()
    present = (torch.arange(2, device=dev)[None] < s.n_objects[:, None]).float()
    return alpha * present[:, :, None, None]


def render(scenes: Scenes, device: torch.device | str | None = None, size: int = IMAGE_SIZE,
           antialias: bool = True) -> torch.Tensor:
    """Render scenes to a float tensor (B, 3, size, size) in [0, 1] on ``device`` (vectorised)."""
    dev = torch.device(device) if device is not None else scenes.center.device
    s = scenes.to(dev)
    B = len(s)
    alpha = object_alpha(s, dev, size, antialias)
    img = s.background[:, :, None, None].expand(B, 3, size, size)
    for j in range(2):
        a = alpha[:, j, None]
        img = img * (1 - a) + s.rgb[:, j, :, None, None] * a
    return img.clamp(0, 1)


# ----------------------------------------------------------------------------------------------- captions
def _object_phrase(size: str, colour: str, shape: str) -> str:
    return f"{size} {colour} {shape}"


def caption_from_attributes(attrs: dict, template: int = 0) -> str:
    """Caption for plain attributes (see :meth:`Scenes.attributes`) with template number ``template``."""
    objs = attrs["objects"]
    a = _object_phrase(objs[0]["size"], objs[0]["colour"], objs[0]["shape"])
    if attrs["n_objects"] == 1:
        return ONE_OBJECT_TEMPLATES[template].format(a=a, pos=POSITION_PHRASES[attrs["position"]])
    b = _object_phrase(objs[1]["size"], objs[1]["colour"], objs[1]["shape"])
    return TWO_OBJECT_TEMPLATES[template].format(a=a, b=b, rel=RELATION_PHRASES[attrs["relation"]])


def captions(scenes: Scenes) -> list[str]:
    """The caption of every scene (its own template)."""
    return [caption_from_attributes(scenes.attributes(i), int(scenes.template[i])) for i in range(len(scenes))]


def parse_caption(caption: str) -> dict:
    """Attributes stated by a caption of this world (inverse of :func:`caption_from_attributes`).

    Raises ``ValueError`` for text that is not a caption of this world.
    """
    words = caption.lower().replace(",", " ").split()
    objs = []
    i = 0
    while i < len(words) - 2:
        if words[i] in SIZES and words[i + 1] in COLOURS and words[i + 2] in SHAPES:
            objs.append({"size": words[i], "colour": words[i + 1], "shape": words[i + 2]})
            i += 3
        else:
            i += 1
    text = " " + " ".join(words) + " "
    if len(objs) == 1:
        found = [p for p, ph in POSITION_PHRASES.items() if f" {ph} " in text]
        if len(found) != 1:
            raise ValueError(f"Cannot find exactly one position in {caption!r}.")
        return {"n_objects": 1, "objects": objs, "position": found[0]}
    if len(objs) == 2:
        # longest phrases first: 'to the left of' before any shorter match
        found = [r for r, ph in sorted(RELATION_PHRASES.items(), key=lambda kv: -len(kv[1])) if f" {ph} " in text]
        if len(found) != 1:
            raise ValueError(f"Cannot find exactly one relation in {caption!r}.")
        return {"n_objects": 2, "objects": objs, "relation": found[0]}
    raise ValueError(f"{caption!r} does not describe one or two objects as '<size> <colour> <shape>'.")


def scenes_from_attributes(attr_list: Sequence[dict], templates: Sequence[int] | None = None) -> Scenes:
    """Index tensors for parsed captions (geometry fields are filled with canonical anchor values).

    Useful to score generated images against prompts: only the attribute fields matter there.
    """
    n = len(attr_list)
    colour = torch.full((n, 2), -1, dtype=torch.long)
    shape = colour.clone()
    size = colour.clone()
    layout = torch.zeros(n, dtype=torch.long)
    n_obj = torch.zeros(n, dtype=torch.long)
    for i, a in enumerate(attr_list):
        n_obj[i] = a["n_objects"]
        for j, o in enumerate(a["objects"]):
            colour[i, j] = COLOUR_NAMES.index(o["colour"])
            shape[i, j] = SHAPES.index(o["shape"])
            size[i, j] = SIZES.index(o["size"])
        layout[i] = POSITIONS.index(a["position"]) if a["n_objects"] == 1 else RELATIONS.index(a["relation"])
    template = torch.tensor(list(templates) if templates is not None else [0] * n, dtype=torch.long)
    zeros2 = torch.zeros(n, 2)
    return Scenes(n_objects=n_obj, layout=layout, colour=colour, shape=shape, size=size, template=template,
                  center=torch.zeros(n, 2, 2), radius=zeros2, rgb=torch.zeros(n, 2, 3),
                  background=torch.full((n, 3), BACKGROUND_GREY))


def scenes_from_captions(caps: Sequence[str]) -> Scenes:
    return scenes_from_attributes([parse_caption(c) for c in caps])


# ---------------------------------------------------------------------------------------- canonical form
def canonical_targets(scenes: Scenes) -> dict[str, torch.Tensor]:
    """Canonical labels: ``layout`` (7 classes) and slot-ordered ``colour``/``shape``/``size`` (B, 2).

    Two objects: slot 0 is the upper object (``above``/``below``) or the left one (``left``/``right``).
    Slot 1 is -1 for one object.
    """
    two = scenes.n_objects == 2
    rel = scenes.layout
    layout = torch.where(two, len(POSITIONS) + (rel >= 2).long(), scenes.layout)
    swap = two & ((rel == 1) | (rel == 3))   # A below B / A right of B: B goes to slot 0
    def order(t):
        return torch.where(swap[:, None], t.flip(1), t)
    return {"layout": layout, "colour": order(scenes.colour), "shape": order(scenes.shape),
            "size": order(scenes.size)}


def semantic_keys(scenes: Scenes) -> torch.Tensor:
    """One integer per scene that is equal exactly when two scenes state the same canonical attributes."""
    t = canonical_targets(scenes)
    key = t["layout"]
    for j in range(2):
        for name, n in (("colour", len(COLOUR_NAMES)), ("shape", len(SHAPES)), ("size", len(SIZES))):
            key = key * (n + 1) + (t[name][:, j] + 1)
    return key
