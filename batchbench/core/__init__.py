"""Mesh, train state, optimizer, the train and eval programs, and the one builder."""
