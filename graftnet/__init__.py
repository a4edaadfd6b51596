"""graftnet: graft new heads onto pretrained backbones, train them, and show what happened."""
__version__ = "0.1.0"
