"""fastssl: fast self-supervised pretraining (the SSL cookbook, Balestriero et al. 2023)."""

__version__ = "0.1.0"
