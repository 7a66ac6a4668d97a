"""Images to training data: packing, the one shard reader/writer, streaming, latent cache, Poisson sampler."""
