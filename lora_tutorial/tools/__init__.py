"""Tools that run the notebooks: the runner, the sweep and its engines, the lab launcher, the
README's tables and the word budget."""
