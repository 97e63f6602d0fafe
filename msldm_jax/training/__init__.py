"""Training loops for the two stages and what they share (checkpoints, metrics, guards)."""
