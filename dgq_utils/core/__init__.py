"""Pure tensor math, no model and no pipeline: quantizers (:mod:`.quantizers`), DGQ's channel/pixel grouping
(:mod:`.grouping`), K-means in worker processes (:mod:`.kmeans`, torch-free) and the streaming statistics that
observation and calibration feed (:mod:`.stats`)."""
