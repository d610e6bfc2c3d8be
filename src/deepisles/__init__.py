"""deepisles: find and measure acute ischemic stroke lesions on brain MRI (DeepISLES ensemble)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deepisles")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "segment", "evaluate"]


def __getattr__(name):  # lazy: `import deepisles` stays cheap, the API pulls in the pipeline
    if name in ("segment", "evaluate"):
        from deepisles import api

        return getattr(api, name)
    raise AttributeError(name)
