"""fedrec's Flower ServerApp, strategy and simulation runner."""
