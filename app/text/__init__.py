"""Client text on its way to the prompt."""
