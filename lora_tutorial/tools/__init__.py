"""What runs the notebooks: the runner, the sweep and its engines, the lab, the README's tables."""
