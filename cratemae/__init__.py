"""cratemae: CRATE-MAE, the white-box masked autoencoder, from pre-training to export.

Importing the package registers the `crate_mae_{tiny,small,base,large}` encoders with timm,
so that `timm.create_model("crate_mae_base", ...)` works. The registration runs when timm
is imported (now, if it already is), so that `import cratemae` itself stays light: the
command line imports this package on every call and loads torch only inside commands.
"""

from importlib.metadata import PackageNotFoundError, version

from cratemae._post_import import call_after_import

try:
    __version__ = version("cratemae")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

call_after_import("timm", "cratemae.weights.timm_models:register_timm_models")

__all__ = ["__version__"]
