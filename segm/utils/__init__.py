"""Process, file and logging utilities."""
