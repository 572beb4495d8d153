"""Measure images: metrics, one module per family (:mod:`.metrics`), bootstrap confidence intervals
(:mod:`.confidence`), result tables (:mod:`.results`), the configuration objects of an evaluation
(:mod:`.config`), recipe comparisons (:mod:`.compare`) and the paper's protocol (:mod:`.protocol`).

Nothing here knows the embedded world: it plugs in from :mod:`dgq_utils.world` through the metric registries
(feature extractors) and plain callables (CLIP scorer, alignment evaluator)."""
