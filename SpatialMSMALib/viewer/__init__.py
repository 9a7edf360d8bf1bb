"""The browser viewer (``spatial-msma view``): trame-slicer around the Slicer module's logic."""
