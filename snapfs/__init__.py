"""snapfs: point-in-time snapshots and changed-block tracking (CBT) of disk images and
block devices, served as a FUSE filesystem in user space (a user-space blksnap)."""

__version__ = "0.1.0"
