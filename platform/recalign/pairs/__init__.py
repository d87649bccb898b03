"""Preference pairs: building them from rewards and data, reading them for training."""
