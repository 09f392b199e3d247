"""Matching: nearest neighbour, soft-argmax, confidence and flip; dense correspondence; benchmark pairs. No FiftyOne import."""
