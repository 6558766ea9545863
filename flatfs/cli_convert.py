"""`flatfs convert` (see convert.py)."""
