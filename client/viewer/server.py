"""``fedct serve``: a local web viewer that diagnoses uploaded studies and shows the evidence."""
