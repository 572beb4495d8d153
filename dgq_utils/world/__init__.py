"""The synthetic captioned world of the embedded model: scenes, tokenizer, evaluator, small CLIP, metrics.

Submodules (imported lazily, so ``import dgq_utils.world`` stays cheap):

* :mod:`~dgq_utils.world.scenes`     attributes, seeded sampling, vectorised rendering, captions, splits
* :mod:`~dgq_utils.world.text`       the word-level CLIP tokenizer of the world, caption -> ids on the GPU
* :mod:`~dgq_utils.world.models`     architectures (SD classes at a small size) and the attribute classifier
* :mod:`~dgq_utils.world.evaluator`  the trained attribute evaluator and alignment scoring
* :mod:`~dgq_utils.world.clip`       the small CLIP behind an open_clip-like interface, CLIP score
* :mod:`~dgq_utils.world.fidelity`   torch-fidelity feature extractor (FID/KID/IS-style on this world)
* :mod:`~dgq_utils.world.quality`    evaluate_pipeline: alignment + FID + CLIP score of any pipeline
* :mod:`~dgq_utils.world.phenomena`  activation channel ranges and cross-attention <start> mass
* :mod:`~dgq_utils.world.train`      training loops used by scripts/train_embedded.py
"""
from dgq_utils.world.scenes import (
    COLOUR_NAMES,
    HELDOUT_COMBOS,
    LAYOUTS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scenes,
    canonical_targets,
    caption_from_attributes,
    captions,
    parse_caption,
    render,
    sample_scenes,
    scenes_from_captions,
    vocabulary,
)
