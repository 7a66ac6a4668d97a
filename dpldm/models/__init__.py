"""Pipeline folders, text encoders, adapters (LoDA, LoRA, attention, full), diffusion loss, EMA, export."""
