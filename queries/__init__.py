"""DuckDB queries over the Parquet lake."""
