"""edgec: compile trained multimodal (CLIP-style) models for edge devices and prove they still agree."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgec")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"
