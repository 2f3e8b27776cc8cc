"""Adapters from official dataset layouts to the common manifest."""
