"""One-off studies (see README.md here), importable so tests need no paths."""
