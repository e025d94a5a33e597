"""Data sets, transforms and category tables."""
