"""adevents pipeline: spool -> validate -> dedupe -> enrich -> Parquet, exactly once."""
