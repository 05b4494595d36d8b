"""Failover drills: traffic, faults, measurement, reports."""
