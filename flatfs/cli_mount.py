"""`flatfs mount` / `flatfs umount` (see fuse.py). Imports mfusepy only when run."""
