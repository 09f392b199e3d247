"""Pictures: feature and match views behind the panel, instance-swap compositing. No FiftyOne import."""
