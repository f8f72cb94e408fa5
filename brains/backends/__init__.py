"""Model backends behind the engine's one interface."""
