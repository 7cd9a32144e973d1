"""Command-line scripts that download and convert datasets into the layouts read by ``segm.data``."""
