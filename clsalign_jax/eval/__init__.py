"""Evaluation room: benchmark loaders, attacks (direct, prefill, decoding grid, DeepInception,
GCG, AutoDAN), judges, the ASR harness, utility, the logit probe, and the report.

Modules: `benchmarks`, `attacks`, `gcg`, `autodan`, `judges`, `harness`, `utility`, `probe`,
`report`, and `lm` (the one seam to the model and decode rooms). Import what you need from them;
this package imports nothing heavy on its own.
"""
