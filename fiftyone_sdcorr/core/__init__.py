"""Tensor layer: models, recipe, extractor, fusion, matching, store, pictures. No FiftyOne import."""
