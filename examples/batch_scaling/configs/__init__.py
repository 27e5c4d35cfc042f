"""Configurations of the batch-scaling study (ml_collections, see main.py)."""
