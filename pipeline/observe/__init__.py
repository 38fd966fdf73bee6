"""Operations: what a sync tells the outside world, and what monitoring reads from the mirror.

``watch`` holds ``observed_sync``, the one function the ``sync`` command and the scheduler's
job run a sync through: it wraps ``pipeline.sync.run.run_sync`` with Healthchecks-style pings
(``ping``), Apprise notifications (``notify``) and the Prometheus textfile (``metrics``).
``metrics`` also serves ``/metrics`` for ``comfysync schedule``, and ``check`` is the
monitoring-plugin check of ``comfysync status --check``. Everything here is derived from the
run log, so a cron job (a new process each time) knows as much as a long-running schedule.
It may import the sync (to run one), the store (to read the run log and add warnings to a
run's record), the read side's run log and change list, the settings, the errors, times and
printable; never the CLI, the jobs or the simulator. Apprise and prometheus_client are
imported lazily, only by a sync that uses them.
"""
