"""moec."""
