"""The capture engine: runs a frozen teacher and writes a store."""
