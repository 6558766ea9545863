"""Test helpers shared by several test packages (not test modules)."""
