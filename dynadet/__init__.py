"""dynadet: dynamic object detectors in pure PyTorch."""

__version__ = "0.1.0"
