"""Tiny random diffusers pipelines, CLIP models and prompts built in code, for tests and demos (:mod:`.tiny`)."""
