"""graphspace.data."""
