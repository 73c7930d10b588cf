"""Model Merging from Scratch: course library."""

__version__ = "0.1.0"
