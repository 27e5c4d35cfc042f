"""Configurations of the BERT example (ml_collections, see main.py)."""
