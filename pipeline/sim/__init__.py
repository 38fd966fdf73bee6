"""The simulator: a faithful ComfyControl on loopback, for the demo, the tests and benchmarks.

``simulator`` serves an account (starlette + uvicorn), ``faults`` draws the failures it can
play, and ``demo`` runs ``comfysync demo`` against it. Only ``pipeline.cli`` (and tests and
benchmarks) import this package; nothing in the product depends on it.
"""
