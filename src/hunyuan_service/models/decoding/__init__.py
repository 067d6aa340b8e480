"""The continuous decoder: a KV pool, rows that join and leave between steps, one step for all."""
