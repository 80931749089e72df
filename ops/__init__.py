"""Image operations for skustudio. No Ray imports here: the pipeline decides placement."""
