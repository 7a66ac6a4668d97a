"""Many processes: rank discovery (torchrun, SLURM), collectives, optimizer engines, rank agreement."""
