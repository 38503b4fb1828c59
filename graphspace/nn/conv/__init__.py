"""graphspace.nn.conv."""
