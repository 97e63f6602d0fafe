"""Device mesh and sharding rules; model code carries no sharding annotations."""
