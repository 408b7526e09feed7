"""Progressive training: the stage plan, checkpoints, and the accelerate loop."""
