"""Evaluation room: benchmark loaders, attacks (direct, prefill, decoding grid, DeepInception,
GCG, AutoDAN), judges, the ASR harness, utility, the logit probe, and the report.

Modules: `benchmarks`, `attacks`, `gcg`, `autodan`, `judges`, `harness`, `utility`, `probe`,
`report`, `run_metrics`, `linear_probe`, and `lm` (`TargetModel`: loading a variant and scoring, on
`decode.text.Decoder`'s generation). Import what you need from them;
this package imports nothing heavy on its own.
"""
