"""Configurations of the quickstart example."""
