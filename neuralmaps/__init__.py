"""neuralmaps: SNAP neural maps in PyTorch + GIS."""

__version__ = "0.1.0"
