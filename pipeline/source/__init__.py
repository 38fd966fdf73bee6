"""The source: what ComfyControl sends, and what it proves.

``client`` speaks HTTP (one page request, retried, checked), ``walk`` reads every page and
proves the walk saw a still picture, ``absence`` re-reads the pages of runners a complete
walk missed, and ``records`` turns raw runner objects into the rows the store keeps
(validated, redacted, fingerprinted). Nothing here touches the store: these modules import
only each other and ``pipeline.errors``, ``pipeline.settings`` and ``pipeline.times``.
"""
