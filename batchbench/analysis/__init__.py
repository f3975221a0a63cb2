"""Analysis of rows and points: selection per batch, fits, statistics. Imports no JAX."""
