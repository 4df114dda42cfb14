"""Edit states on disk: the save format (``checkpoint.py``), the PEFT export (``export.py``), and the
helpers both use never to lose data (``files.py``). These read and write edit states, not editors."""
