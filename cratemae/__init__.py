"""cratemae: CRATE-MAE, the white-box masked autoencoder, from pre-training to export.

`import cratemae` is light: it imports neither torch nor timm (the command line imports
this package on every call and loads torch only inside commands). The encoders are
registered with timm, as `crate_mae_{tiny,small,base,large}`, by importing
`cratemae.weights.timm_models`; nothing else registers them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cratemae")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
