"""keiryo: faster PyTorch training and lighter models, with the measurements to prove both.

The public API is the names below. Internal code imports from the submodules (`from keiryo.metrics import
compare`), since `keiryo.train` and `keiryo.measure` name the functions, not the modules.
"""

from keiryo.artifacts import load, save
from keiryo.compress.distill import distill
from keiryo.compress.prune import prune
from keiryo.compress.quantize import quantize
from keiryo.errors import KeiryoError
from keiryo.loop import train
from keiryo.metrics import compare, measure

__version__ = "0.1.0"


def run(recipe, out_dir=None, *, progress: bool = True, force: bool = False, trust_code: bool = False):
    """Run a recipe (a YAML path or a dict) and return its side-by-side `Report`; see `keiryo.recipe`.

    A recipe is data: a model spec in it that is not one of keiryo's built-ins (code it would import) is
    refused unless `trust_code=True`.
    """
    from keiryo.recipe import run_recipe

    return run_recipe(recipe, out_dir, progress=progress, force=force, trust_code=trust_code)[0]


__all__ = [
    "KeiryoError",
    "compare",
    "distill",
    "load",
    "measure",
    "prune",
    "quantize",
    "run",
    "save",
    "train",
]
