"""Seeded, cached, resumable image generation (:mod:`.images`)."""
