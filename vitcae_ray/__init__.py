"""vitcae_ray: distributed ViTCAE training on Ray.

``vitcae_ray.load_pretrained(model_dir)`` loads an exported model for inference.
"""


def __getattr__(name: str):
    if name == "load_pretrained":  # imported on first use: ``import vitcae_ray`` stays light
        from .pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'vitcae_ray' has no attribute {name!r}")


__all__ = ["load_pretrained"]
