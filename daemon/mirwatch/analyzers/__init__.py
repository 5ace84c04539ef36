"""Analyzers: each turns a decoded track into sidecar keys."""
