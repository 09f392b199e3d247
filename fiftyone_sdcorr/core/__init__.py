"""Tensor layer, one folder per concern: features/, matching/, benchmarks/, pictures/, common/. No FiftyOne import."""
