"""The lake: Delta tables on local disk or S3, written exactly once, read as snapshots.

Modules, from the bottom: ``location`` (LAKE_URI and S3 settings; ``probe`` is its start-up
``check``),
``tables`` (the tables' schemas and partitions, create-if-missing), ``writer`` (Parquet files
committed as add actions with an application transaction), ``snapshot`` (readers: a pyarrow
dataset per table in DuckDB) and ``maintenance`` (optimize, checkpoints, retention, vacuum);
``testing`` makes schema-true frames for tests and benches.
It imports only ``pipeline.schema`` from the project.
"""
