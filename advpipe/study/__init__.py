"""``advpipe study``: grids of training runs, run on dask, resumable, aggregated across seeds."""
