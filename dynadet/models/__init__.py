"""Backbones, necks, heads and detectors."""
