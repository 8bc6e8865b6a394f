"""ablations stage of mixlab."""
