"""Hospital side: the Flower ClientApp that trains the shared model on a site-local cache."""
