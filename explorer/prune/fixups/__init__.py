"""prune/fixups."""
