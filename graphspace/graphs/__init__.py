"""graphspace.graphs."""
