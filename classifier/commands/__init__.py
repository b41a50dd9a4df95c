"""One module per `classifier` command: each parses its options, picks its output folder and calls the engine."""
