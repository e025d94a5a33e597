"""dynadet: dynamic object detectors in pure PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Detector", "Prediction", "__version__"]

if TYPE_CHECKING:
    from dynadet.api import Detector, Prediction


def __getattr__(name: str) -> Any:
    # the API pulls in torch and every model; keep `import dynadet` (and the CLI's --help) light
    if name in ("Detector", "Prediction"):
        from dynadet import api

        return getattr(api, name)
    raise AttributeError(f"module 'dynadet' has no attribute {name!r}")
