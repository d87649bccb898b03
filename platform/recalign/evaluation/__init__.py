"""The final evaluation of every system on the test split (stage), its statistics and its reports."""
