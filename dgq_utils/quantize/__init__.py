"""Quantize a pipeline with a recipe and undo it (:mod:`.pipeline`); save and load the calibrated state
(:mod:`.state`); the calibrated-state cache with its one key function (:mod:`.cache`)."""
