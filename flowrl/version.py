"""flowrl's version (imported by checkpoints and exports, which record it)."""

__version__ = "0.1.0"
