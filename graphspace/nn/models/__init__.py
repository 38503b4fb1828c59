"""graphspace.nn.models."""
