"""The library version, in a module of its own so files that record it can import it at load time."""

__version__ = "0.1.0"
