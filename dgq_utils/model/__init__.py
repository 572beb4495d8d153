"""The model floor: loading a diffusers pipeline (:mod:`.loading`), the quantized Linear/Conv2d twins
(:mod:`.layers`), the DGQ attention processor (:mod:`.attention`), per-timestep parameter sets
(:mod:`.timesteps`) and the word-level CLIP tokenizer builder (:mod:`.tokenizer`)."""
