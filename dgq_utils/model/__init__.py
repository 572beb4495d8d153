"""The model floor: loading a diffusers pipeline (:mod:`.loading`), the quantized Linear/Conv2d twins
(:mod:`.layers`) and their 8-bit executions (:mod:`.int8_layers`), the DGQ attention processor (:mod:`.attention`), per-timestep parameter sets
(:mod:`.timesteps`), the model's identity for cache keys (:mod:`.identity`), a second pipeline around a copied UNet
(:mod:`.copying`) and the word-level CLIP tokenizer builder (:mod:`.tokenizer`)."""
