"""How it is measured: the pytest plugin, selection, cases, the runner, clocks, the gate, peaks, units."""
