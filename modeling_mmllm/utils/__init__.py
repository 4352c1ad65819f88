"""Small shared utilities of the library side (logging)."""
