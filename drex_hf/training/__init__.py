"""Training exit heads: recipes, data, feature cache, losses, trainer, evaluation (`drex train`)."""

from drex_hf.training.recipe import Recipe, load_recipe

__all__ = ["Recipe", "load_recipe"]
