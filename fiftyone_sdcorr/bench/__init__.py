"""Benchmarks (python -m fiftyone_sdcorr bench): not imported by the runtime."""
