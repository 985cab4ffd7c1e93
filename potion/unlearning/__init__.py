"""Unlearning methods (registered by name) and the shared pieces they are built from."""
