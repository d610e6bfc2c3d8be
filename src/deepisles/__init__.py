"""deepisles: find and measure acute ischemic stroke lesions on brain MRI (DeepISLES ensemble)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deepisles")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

from deepisles.api import evaluate, segment  # noqa: E402

__all__ = ["__version__", "segment", "evaluate"]
