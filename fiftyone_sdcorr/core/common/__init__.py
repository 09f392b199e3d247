"""Shared by every concern: parameter checks, checked file writes, image loading, letterbox geometry. No FiftyOne import."""
