"""Compression: magnitude and channel pruning (prune.py), knowledge distillation (distill.py)."""
