"""A tiny concept world (48 images of 16 px) and a demo CNN trained on it for one epoch: seconds to
build, for tests of command plumbing (validation order, bad images) rather than of what a model learned."""

from pathlib import Path


def build_tiny_demo(root):
    """``(world_dir, weights)`` under ``root``."""
    from conceptlens.demo_model import train_demo
    from conceptlens.world import generate_world

    world = generate_world(Path(root) / "world", n=48, size=16, seed=0, progress=False)
    weights = Path(root) / "model" / "demo.pt"
    train_demo(world.root, weights, epochs=1, device="cpu", progress=False)
    return world.root, weights
