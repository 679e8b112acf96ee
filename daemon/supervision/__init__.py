"""The parts of DM supervision, each in its own module; daemon.supervisor composes them into the Supervisor the
REST API drives.

* :mod:`.state` — the guest's lifecycle: :class:`GuestState`, the ``VALID_TRANSITIONS`` table, the ``Guest``
  runtime record whose one ``set_state`` checks the table;
* :mod:`.errors` — the supervisor's errors, each with the HTTP status the API answers with;
* :mod:`.settings` — ``SupervisorConfig``;
* :mod:`.restart` — the restart policy (policy words, ``max_restarts`` per ``restart_window_s``, backoff), one
  implementation for DMs and back-ends;
* :mod:`.pidwatch` — pidfds: open one for a verified pid, watch it on the event loop, read the exit status;
* :mod:`.spawn` — the process builder: every fd of the DM's argv contract, jail uids;
* :mod:`.forkserver` — the DM zygote's daemon end (``--dm-spawn zygote``): fork a pre-imported DM per guest,
  its pidfd and exit status reported by the zygote, the zygote restarted when it dies;
* :mod:`.backend_supervisor` — daemon-managed vhost-user back-ends: watch, restart, re-attach, stop;
* :mod:`.link` — the control client of one guest (connect, typed calls, errors mapped to SupervisorError).
"""
