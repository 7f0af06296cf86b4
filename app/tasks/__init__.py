"""Per task: the prompt MedMO was trained with, and the parser for what it writes back."""
