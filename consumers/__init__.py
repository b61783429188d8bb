"""Dedup consumers (filled in by the consumers issue)."""
