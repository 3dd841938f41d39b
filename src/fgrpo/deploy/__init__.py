"""Running fgrpo: in-process simulation and comparisons, and Flower deployment (files, commands, a loopback federation)."""
