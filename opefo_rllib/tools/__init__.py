"""Scripts that build what the library ships (``python -m opefo_rllib.tools.make_tiny``); no
library code imports them."""
