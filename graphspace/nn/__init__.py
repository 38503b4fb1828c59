"""graphspace.nn."""
