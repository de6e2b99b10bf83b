"""PTM-Mamba: a PTM-aware protein language model, and the pipeline that trains it."""

__version__ = "0.1.0"
