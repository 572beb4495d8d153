"""Quantize a pipeline with a recipe and undo it (:mod:`.pipeline`); save and load the calibrated state
(:mod:`.state`)."""
