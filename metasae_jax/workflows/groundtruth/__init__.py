"""Ground-truth atomicity benchmark: synthetic data with known features, joint vs solo SAEs, scored against the truth.

scenarios: the five data generators; scores: per-SAE scores against the truth; study: data, training, resume;
report: seed intervals, paired tests, verdicts, report.json/report.md/plots. See docs/groundtruth.md.
"""
