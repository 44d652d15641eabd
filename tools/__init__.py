"""Tooling for lent GPU machines, importable so tests need no paths."""
