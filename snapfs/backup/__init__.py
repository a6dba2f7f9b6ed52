"""``snapfs backup``: full and CBT-incremental backups of snapfs devices into a
verified, deduplicating repository; restore, verify, prune, gc, and a read-only mount
of every point.

Modules, lowest first (tests/test_layering.py enforces the direction): ``repo`` (the
on-disk format, defined in one place), ``chunks`` (digest, zero test, compression,
verified chunk I/O), ``output`` (exit codes, tables, progress), ``create``,
``restore``, ``verify``, ``prune`` (and gc), ``mountfs`` (the pyfuse3 mount), ``cli``.
The backup side talks to a running snapfs mount only through ``snapfs.client``.
"""
