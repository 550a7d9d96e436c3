"""vitcae_ray: distributed ViTCAE training on Ray."""
