"""vhost-user back-ends: pv devices served to a front-end in another process (QEMU docs/interop/vhost-user.rst).

:mod:`pv.vhost_user.protocol` is the sans-I/O wire format; :mod:`pv.vhost_user.backend` the session state machine
and the unix-socket server that drives an unchanged :class:`pv.device.VirtioDevice`.
"""
