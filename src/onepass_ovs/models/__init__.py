"""Model families and their building blocks (one module per stage of the data flow)."""
