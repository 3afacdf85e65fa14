"""keiryo: faster PyTorch training and lighter models, with the measurements to prove both.

The public API is the names below. Internal code imports from the submodules (`from keiryo.measure import
compare`), since `keiryo.train` and `keiryo.measure` name the functions, not the modules.
"""

from keiryo.artifacts import load, save
from keiryo.errors import KeiryoError
from keiryo.measure import compare, measure
from keiryo.train import train

__all__ = ["KeiryoError", "compare", "load", "measure", "save", "train"]
__version__ = "0.1.0"
