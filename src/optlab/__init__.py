"""optlab: a research workbench for comparing optimizers and step-control methods."""

__version__ = "0.1.0"
