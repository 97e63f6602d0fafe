"""Training losses and validation metrics."""
