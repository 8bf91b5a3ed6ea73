"""What travels between the sites and the coordinator: model weights, site errors."""
