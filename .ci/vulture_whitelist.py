"""Names vulture cannot see used: frameworks and protocols call them, not our code.

Click commands and the schema's migrations are skipped by decorator in .ci/run instead.
Each bare name below counts as a use of every definition of that name.
"""
# ruff: noqa: B018, F821

# pipeline/__init__.py: the module __getattr__ (PEP 562) that loads the public API lazily.
__getattr__
# click: the hooks of its parameter types and groups.
_describe_range
command_class
# click: `comfysync config check`, registered by its group's decorator.
config_check
# The simulator's scripted faults: the tests script them (tests are not scanned).
fail_next
fail_always
once
# uvicorn reads these flags of the server it runs.
should_exit
force_exit
# Parameters a protocol requires: ASGI apps, __aexit__, signal handlers.
scope
receive
exc_type
tb
frame
# RunnerRecord: a NamedTuple stored whole, field by field in TRACKED_FIELDS order.
extra
# prometheus_client calls a collector's collect() at each scrape (pipeline.observe.metrics).
collect
