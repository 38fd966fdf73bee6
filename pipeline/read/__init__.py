"""The read side: what the mirror holds, for people and programs, never writing it.

``history`` (the fleet as of an instant), ``changelog`` (what each sync changed),
``overview`` (status and the run log), ``report`` (their text for a terminal), ``frames``
(the pandas API) and ``browse`` (Datasette). Every module opens the store read-only
(``pipeline.store.schema``) and never imports the write path, the sync or the simulator.
"""
