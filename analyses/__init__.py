"""Analyses built on HookedLlava."""
