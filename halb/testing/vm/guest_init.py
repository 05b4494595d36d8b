"""The guest's /init (busybox sh), kept apart so the image hash covers its text.

It loads the modules listed in /modules.order, mounts the host's root read-only over
9p at /host (``cache=loose``: the host root does not change under a test run, and
caching makes Python's many stat() calls cheap), gives it writable /tmp and /run, mounts
the results share at /host/run/halb-vm, chroots and runs ``run.sh`` from that share,
then records its exit code and powers off. Every step logs to the serial console.
"""

from __future__ import annotations

__all__ = ["GUEST_RESULTS", "INIT_SCRIPT"]

GUEST_RESULTS = "/run/halb-vm"  # the results share, as the chrooted command sees it

INIT_SCRIPT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "halb-vm: init at $(cut -d' ' -f1 /proc/uptime) s"
for m in $(cat /modules.order); do
  insmod /lib/modules/$m.ko || echo "halb-vm: insmod $m failed"
done
echo "halb-vm: modules loaded at $(cut -d' ' -f1 /proc/uptime) s"
R=/host/run/halb-vm
fail() { echo "halb-vm: $*"; poweroff -f; sleep 5; reboot -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro hostroot /host \
  || fail "cannot mount the host root"
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mount -t tmpfs tmpfs /host/tmp
mount -t tmpfs tmpfs /host/run
mount -t tmpfs tmpfs /host/var/tmp
mkdir -p $R
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results $R \
  || fail "cannot mount the results share"
if [ -f $R/project-path ]; then
  P=$(cat $R/project-path)
  mkdir -p /host$P
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro project /host$P \
    || fail "cannot mount the project share at $P"
fi
ip link set lo up
echo "$(cut -d' ' -f1 /proc/uptime)" > $R/started
echo "halb-vm: running run.sh at $(cut -d' ' -f1 /proc/uptime) s"
chroot /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/tmp LANG=C.UTF-8 HALB_VM_GUEST=1 /bin/sh /run/halb-vm/run.sh > $R/output.log 2>&1
rc=$?
echo "$(cut -d' ' -f1 /proc/uptime)" > $R/finished
echo $rc > $R/exit-code
echo "halb-vm: run.sh exited $rc at $(cut -d' ' -f1 /proc/uptime) s"
sync
umount $R
poweroff -f
sleep 5
reboot -f
"""
