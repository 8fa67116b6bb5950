"""Train students from a logitstore store."""
