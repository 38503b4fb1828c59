"""graphspace.merge."""
