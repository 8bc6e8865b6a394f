"""pipelines stage of mixlab."""
