"""Features: model loading, the SD + DINOv2 extractor, fusion, methods and adapters, the feature store. No FiftyOne import."""
