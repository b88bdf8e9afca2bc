"""Builds models and adapters: for now, the demo model."""
