"""Training loops, losses and augmentation (torch; not needed at run time)."""
