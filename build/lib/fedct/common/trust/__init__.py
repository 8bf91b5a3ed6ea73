"""Who may take part and which code runs: certificates and signed app bundles."""
