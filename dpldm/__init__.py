"""dpldm: differentially private fine-tuning of latent diffusion models."""
__version__ = "0.1.0"
