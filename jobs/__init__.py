"""Scheduled jobs: APScheduler wiring around pipeline.sync.run_sync."""
