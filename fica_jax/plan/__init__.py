"""`fica plan`: the train step compiled ahead of time for a virtual mesh or a TPU topology that is
not there, with its bytes per chip and a roofline step-time prediction (`planner.py`)."""
