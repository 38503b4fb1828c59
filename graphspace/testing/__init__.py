"""graphspace.testing."""
