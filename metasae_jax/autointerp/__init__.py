"""Automated interpretability of matched joint/solo latents: examples, LLM explainer, two fuzzing scorers."""
