"""Applications built on moekit: the ``moekit`` commands (``commands``, ``surgery``), the main
job (``demo``), the performance suite (``bench``) and a one-minute layer demo (``digits``)."""
