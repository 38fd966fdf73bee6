"""Files made from the mirror: ``export`` writes one Parquet or CSV file atomically, and
``snapshot`` owns the Hive-partitioned series of snapshot files a sync leaves behind. They
read the store; they never write it and never import the sync or the simulator.
"""
