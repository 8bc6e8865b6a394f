"""mixtures stage of mixlab."""
