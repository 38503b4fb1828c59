"""graphspace.tasks."""
