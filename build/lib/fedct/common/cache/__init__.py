"""The site-local, model-ready cache: preparing it from raw scans, its files, its quality
report, and the Dataset over it."""
