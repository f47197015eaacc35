"""Storage pools on real disks: `device init`, udev hotplug, eject and device health.

A pool is a block device holding an ext4, xfs or btrfs filesystem marked for Piccolo
(`marker`). The daemon watches udev itself (`monitor`) and reconciles what udev says is
plugged in with what it has mounted (`manager`): a pool that appears is mounted under
`$PICCOLO_RUN_DIR/pools/<pool-id>` and its volumes attached; one that disappears has its
volumes' mounts ended and journaled, and its filesystem lazily unmounted. `blockdev` reads
udev's view of block devices and decides what `device init` must refuse; `fs` runs the
filesystem tools; `health` judges capacity, kernel error counters and SMART.

This room drives ctl.volumes and never imports FUSE.
"""
