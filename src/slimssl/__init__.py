"""slimssl: slimmable self-supervised pretraining."""
__version__ = "0.1.0"
