"""Scheduled jobs: APScheduler wiring around pipeline.observe.watch.observed_sync."""
