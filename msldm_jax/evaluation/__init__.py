"""Evaluation metrics: Fréchet distances, embeddings (VGGish, statistics), music metrics, tables."""
