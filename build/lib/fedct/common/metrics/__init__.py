"""Classification metrics, bootstrap confidence intervals and the COVID-19 operating point."""
