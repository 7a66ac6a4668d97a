"""Differential privacy: clipped per-example gradients, noise, accountants, ledger, run seed, audit."""
