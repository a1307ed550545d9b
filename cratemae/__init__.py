"""cratemae: CRATE-MAE, the white-box masked autoencoder, from pre-training to export."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cratemae")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
