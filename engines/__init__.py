"""Inference engines: the contract (``base``) and llmlb's built-in backends."""
