"""Quantize a pipeline with a recipe and undo it (:mod:`.pipeline`); save and load the calibrated state
(:mod:`.state`); the calibrated-state cache with its one key function (:mod:`.cache`); the one-way conversion of a
calibrated W8A8 pipeline to real 8-bit execution (:mod:`.int8`)."""
