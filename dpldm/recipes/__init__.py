"""Recipes on top of the library: the embedded quickstart and its public-proxy tuning (not library code)."""
