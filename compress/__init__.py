"""compress: turn a large language model into a smaller, faster artifact and prove it ships."""

from compress.artifact import load_artifact as load

__version__ = "0.1.0"
__all__ = ["__version__", "load"]
