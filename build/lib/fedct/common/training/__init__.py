"""Local training and evaluation on one site's data, patient-level DP, and the device it runs on."""
