"""The ai-corona classifier, where its starting weights come from, and its class activation maps."""
