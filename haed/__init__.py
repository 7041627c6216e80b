"""haed: hierarchical autoregressive byte models (HAED) trained with IEM."""

__version__ = "0.1.0"
