"""Detection ops in pure PyTorch (no compiled extension)."""
