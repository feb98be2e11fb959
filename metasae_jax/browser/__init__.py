"""A static, offline HTML browser of a run's joint and solo latents (contexts, histograms, matches, splits)."""
