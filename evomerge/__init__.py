"""evomerge: evolutionary optimization of model-merging recipes."""

__version__ = "0.1.0"
