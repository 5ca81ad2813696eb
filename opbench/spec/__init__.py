"""What is run: model configurations (zoo and config.json), workloads, and plan()."""
