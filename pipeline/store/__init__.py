"""The SQLite store: its schema and migrations, and the one path that writes a sync into it.

``sqlite`` imports sqlite-utils lean, ``schema`` opens (and migrates) a database and owns the
table layout, ``meta`` reads and writes its ``comfysync_meta`` rows, ``keyfile`` keeps the
redaction key beside the database, ``changeset`` holds the values a sync hands the store,
``write`` is the only code that writes runners, versions and the run log, and ``early``
runs its insert of new runners on a thread of its own while the walk goes on. It imports
only ``pipeline.errors``, ``pipeline.settings``, ``pipeline.times`` and the record types of
``pipeline.source.records``.
"""
