"""`drex bench`: policies side by side, and random-weight models of real shapes for trace-driven runs."""
