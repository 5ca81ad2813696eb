# Loads the opbench plugin for every pytest run in this repository (bench/, collectives/, tests/).
pytest_plugins = ["opbench.measure.plugin"]
