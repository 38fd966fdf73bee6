"""Scheduled jobs: APScheduler wiring around pipeline.sync.run.run_sync."""
