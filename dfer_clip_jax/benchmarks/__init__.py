"""Benchmarks of dfer_clip_jax (run as modules, e.g. `python -m dfer_clip_jax.benchmarks.input_pipeline`)."""
