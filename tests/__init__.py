"""The project's own tests; they all run on a machine without a GPU."""
