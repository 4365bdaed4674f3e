"""Training detectors and classifiers: one loop (``loop.fit``), each trainer supplying its step and validation."""
