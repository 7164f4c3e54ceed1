"""car-backend: a Label Studio ML backend that pre-labels images for segmentation with CaR (CLIP as RNN)."""

__version__ = "0.1.0"
