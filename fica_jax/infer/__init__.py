"""Running trained models: everything between a portrait and complete UV maps.

conditioning.py  portrait -> dense predictions -> partial UV maps + image embedding
pose.py          camera / expression from the dense predictor, or a tracker's pose JSON
latents.py       a latent cache read back: its VAE bundle, map statistics, decoding context, batches
latent_cache.py  `fica data cache`: a capture dataset encoded once for the DiT
sample.py        the DiT's guided Euler sampling, decoding and held-out map metrics
refine.py        the UV refiner run on maps, with its portrait render and UV cues
generate.py      a portrait through every exported model to refined UV maps (`fica generate`)
"""
