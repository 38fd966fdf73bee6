"""One sync: walk the source, decide what changed, apply it to the store in one transaction.

``run`` composes the parts (``run_sync``); ``collector`` gathers what the walk saw, page by
page; ``plan`` decides the changes from the walk and the stored state (pure); ``guardrails``
refuses a mass deletion or another account's runners; ``lock`` keeps one sync per database;
``stopping`` turns SIGINT and SIGTERM into a clean stop. It may import the source, the store
and the outputs (snapshots after a sync), never the read side's reports or the simulator.
"""
