"""privtext: word-level differentially private text anonymisation.

The library is the product; the ``privtext`` command is a thin click layer over it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("privtext")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
