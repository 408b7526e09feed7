"""TaxaDiffusion: taxonomy-conditioned diffusion for fine-grained species images.

Importing the package is cheap: submodules that need torch are imported where they are used.
"""

__version__ = "0.1.0"
