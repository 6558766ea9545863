"""Helper modules shared by tests (not tests themselves)."""
