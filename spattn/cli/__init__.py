"""The `spattn` command line."""
