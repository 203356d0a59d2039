"""Studies: YAML schema, sweep expansion, executors, the results store."""
