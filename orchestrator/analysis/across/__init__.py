"""Across studies: nights, hosts and two studies of one plan judged at their own level of replication."""
