"""Measure images: metrics (:mod:`.metrics`), bootstrap confidence intervals (:mod:`.confidence`), result tables
(:mod:`.results`), recipe comparisons (:mod:`.compare`) and the paper's protocol (:mod:`.protocol`)."""
