"""taskiq-redis-cluster."""
