"""The torch-free base every layer stands on: atomic files, the console, errors and exit codes, config flattening, image
decoding."""
