"""The read-only FUSE view of a flattened chain, in four modules:

* ``view``: :class:`~.view.View`, the chain as one read-only file (attributes,
  reads, SEEK_DATA/SEEK_HOLE, statfs), and :func:`~.view.errno_for`, the one place
  where an exception becomes an errno. No FUSE code: tested without a mount.
* ``glue``: the only module that imports mfusepy, lazily, so ``flatfs info``,
  ``map`` and ``convert`` work without libfuse. Forces libfuse 3, adds the
  ``lseek`` and direct ``read`` callbacks, pins libfuse workers' thread states.
* ``mount``: ``flatfs mount`` / ``flatfs umount``: MountRequest, mountpoint
  checks, FUSE options, the server with its ready check.
* ``mountinfo``: ``/proc/self/mountinfo`` parsing and :func:`~.mountinfo.find_mount`.

Daemonising, the readiness pipe and sd_notify are in :mod:`flatfs.service`.
Nothing is imported here: ``import flatfs.fuse.mount`` (the CLI does, when run).
"""
