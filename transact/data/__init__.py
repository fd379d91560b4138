"""Data: a synthetic generator, MovieLens-100K, user action logs, and batching."""
